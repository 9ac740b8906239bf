"""`cake chat` driven headlessly with textual's pilot: a model loaded in-process, and a
running server behind an API key."""
from __future__ import annotations

import argparse
import asyncio
import time

import openai
import pytest

pytest.importorskip("textual")

from textual.widgets import Markdown, TabbedContent, Tree  # noqa: E402

from cake.commands import chat  # noqa: E402
from cake.tui.app import ChatMessage  # noqa: E402
from cake.tui.backends import BackendError  # noqa: E402
from test_auth import start as start_locked  # noqa: E402  (a server whose API needs a key)

KEY = "tui-key"


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    return parser.parse_args(["chat", *argv])


async def wait_for(pilot, condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.05)


async def converse(pilot, text: str):
    """Type a message as a user would, send it, wait for the whole answer."""
    app = pilot.app
    await pilot.press(*text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: len(app.query(".message")) >= 2 and not app.generating)
    return app.query(".message").last()


@pytest.fixture(scope="module")
def local_backend():
    """The embedded default model, loaded in this process as `cake chat` would."""
    backend = chat.make_backend(parse("--temperature", "0", "-n", "40"))
    yield backend
    backend.close()


def test_local_chat_cluster_and_keys(local_backend):
    args = parse("--temperature", "0")
    app = chat.make_app(args, local_backend)

    async def drive():
        async with app.run_test(size=(110, 40)) as pilot:
            reply = await converse(pilot, "What is the capital of France?")
            assert reply.text == "The capital of France is Paris."
            stats = str(reply.query_one(".stats").render())
            assert stats.startswith("8 tokens · ") and stats.endswith(" tok/s"), stats
            assert app.history[-2:] == [
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]
            # A reasoning model's <think> block: dimmed, apart from the answer.
            thinking = ChatMessage("assistant")
            await app.query_one("#messages").mount(thinking)
            await thinking.show("<think>Weigh the options.</think>Paris.")
            box = thinking.query_one(".reasoning")
            assert box.display and "Weigh the options." in str(box.render())
            assert "dim" in str(box.rich_style)
            assert thinking.query_one(Markdown).source == "Paris."
            await thinking.remove()
            # Shift+Enter and Ctrl+J add a line instead of sending.
            await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
            assert app.query_one("#prompt").text == "a\nb\nc"
            assert len(app.query(".message")) == 2
            # Tab shows the cluster: the master alone with all 30 layers and their tensors.
            await pilot.press("tab")
            assert app.query_one(TabbedContent).active == "cluster"
            tree = app.query_one("#cluster-tree", Tree)
            await wait_for(pilot, lambda: len(tree.root.children) == 1)
            master = tree.root.children[0]
            assert "[master]" in str(master.label) and "layers 0–29 (30)" in str(master.label)
            assert str(master.label).endswith("ready")
            layer3 = master.children[3]
            tensors = (await local_backend.topology())["layer_details"]["model.layers.3"]["tensors"]
            assert str(layer3.label).startswith(f"model.layers.3 · {len(tensors)} tensors · ")
            assert [str(leaf.label).split("  ")[:3] for leaf in layer3.children] == [
                [t["short_name"], t["dtype"], str(t["shape"])] for t in tensors]
            master.expand()
            layer3.expand()
            app.refresh_cluster()  # what the 10 s timer does
            await pilot.pause(0.5)
            await wait_for(pilot, lambda: tree.root.children and tree.root.children[0].children
                           and tree.root.children[0].children[3].is_expanded)
            assert not tree.root.children[0].children[4].is_expanded
            await pilot.press("tab")
            assert app.query_one(TabbedContent).active == "chat"
            await pilot.press("escape")
            await pilot.pause(0.2)
            assert not app.is_running

    asyncio.run(drive())


def test_reasoning_is_shown_dimmed_apart_from_the_answer():
    from cake.tui.app import split_think

    assert split_think("<think>hmm</think>Paris.") == ("hmm", "Paris.", False)
    assert split_think("<think>still going") == ("still going", "", True)
    assert split_think("weighed it</think>Paris.") == ("weighed it", "Paris.", False)
    assert split_think("Paris.") == (None, "Paris.", False)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    server = start_locked(tmp_path_factory, "--api-key", KEY)
    yield server
    server.stop()


def test_remote_chat_with_api_key(keyed_server):
    args = parse("--server", keyed_server.url, "--api-key", KEY, "--temperature", "0", "-n", "8")
    backend = chat.make_backend(args)
    assert backend.name == "model"  # the folder's name, learnt before the screen opens
    app = chat.make_app(args, backend)
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    expected = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hello!"}], temperature=0, max_tokens=8)

    async def drive():
        async with app.run_test(size=(110, 40)) as pilot:
            reply = await converse(pilot, "Hello!")
            assert reply.text == expected.choices[0].message.content
            assert str(reply.query_one(".stats").render()).startswith("8 tokens · ")
            await pilot.press("tab")
            tree = app.query_one("#cluster-tree", Tree)
            await wait_for(pilot, lambda: len(tree.root.children) == 1)
            assert "layers 0–1 (2)" in str(tree.root.children[0].label)
            await pilot.press("ctrl+c")
            await pilot.pause(0.2)
            assert not app.is_running

    asyncio.run(drive())


def test_remote_errors_are_shown(keyed_server):
    with pytest.raises(BackendError, match="401: invalid API key"):
        chat.make_backend(parse("--server", keyed_server.url, "--api-key", "wrong"))
    with pytest.raises(BackendError, match="cannot reach"):
        chat.make_backend(parse("--server", "http://127.0.0.1:9"))
    args = parse("--server", keyed_server.url, "--api-key", KEY, "-n", "0")
    app = chat.make_app(args, chat.make_backend(args))

    async def drive():
        async with app.run_test(size=(110, 40)) as pilot:
            reply = await converse(pilot, "Hello!")
            error = str(reply.query_one(".error").render())
            assert error.startswith("server error 400:") and "max_tokens" in error
            assert app.history == []  # the failed turn is not kept

    asyncio.run(drive())
