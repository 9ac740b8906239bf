"""The web UI in a real browser (Debian chromium, headless, driven by Playwright) against a
real `cake serve` of the embedded default model. Screenshots go to test-artifacts/."""
from __future__ import annotations

import contextlib

import json
import os
import re
import shutil
import time

import httpx
import openai
import pytest

from conftest import ROOT

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make install-test` installs it (apt-get)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        yield b
        b.close()


@contextlib.contextmanager
def ui_page(browser, server, shot: str, width: int = 1200, height: int = 800,
            timeout_ms: int = 60_000):
    """A fresh browser context (empty localStorage) on the server's UI; a screenshot is kept
    in test-artifacts/ and page errors fail the test."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(timeout_ms)
    page.goto(server.url + "/")
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser, default_server, request):
    with ui_page(browser, default_server, f"ui-{request.node.name}") as p:
        yield p


def ask(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def wait_answered(page) -> None:
    page.wait_for_selector("#send:not([hidden])")


def stored_messages(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('cake.chat')"))["messages"]


def test_only_fitting_tabs(page):
    page.wait_for_selector("#model-name:has-text('SmolLM2')")
    visible = page.locator("#tabs [data-tab]:visible").all_inner_texts()
    assert visible == ["Chat", "Cluster"]  # a text model: no Image or Audio tab


def test_chat_streams_answer(page, default_server):
    page.fill("#temperature", "0")
    # While the answer streams, Stop replaces Send (too briefly for polling to catch).
    page.evaluate("""() => { window.sawStop = false;
        new MutationObserver(() => { window.sawStop ||= !document.querySelector('#stop').hidden; })
            .observe(document.querySelector('#stop'), {attributes: true}); }""")
    ask(page, "What is the capital of France?")
    wait_answered(page)
    assert page.evaluate("window.sawStop")
    answer = page.locator(".msg.assistant .content").last
    assert "Paris" in answer.inner_text()
    stats = page.locator(".msg.assistant .stats").last.inner_text()
    match = re.fullmatch(r"(\d+) tokens · [\d.]+ tok/s", stats)
    assert match, stats
    # The page shows exactly what the API produces for the same request.
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=1024)
    assert stored_messages(page)[-1]["content"] == r.choices[0].message.content
    assert int(match.group(1)) == r.usage.completion_tokens
    # The conversation is kept in the browser across reloads; a follow-up sends the history.
    page.reload()
    assert "Paris" in page.locator(".msg.assistant .content").last.inner_text()
    ask(page, "And of Italy?")
    wait_answered(page)
    assert [m["role"] for m in stored_messages(page)] == ["user", "assistant"] * 2
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_stop_cancels_generation(page, default_server):
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "2000")
    ask(page, "Write a very long essay about the history of France, century by century.")
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant .content')[0]?.innerText.length > 20")
    page.click("#stop")
    wait_answered(page)
    stats = page.locator(".msg.assistant .stats").inner_text()
    assert stats.endswith("stopped"), stats
    assert int(stats.split()[0]) < 2000
    assert stored_messages(page)[-1]["stopped"] is True
    # The server let go of the generation (the page closed its stream).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        engine = httpx.get(default_server.url + "/health").json()["engine"]
        if engine["running"] == 0:
            break
        time.sleep(0.1)
    assert engine["running"] == 0 and engine["waiting"] == 0


def test_server_error_is_shown(page):
    page.fill("#max-tokens", "0")  # the server rejects max_tokens < 1 with a 400
    ask(page, "Hello")
    error = page.locator(".msg.assistant .error")
    error.wait_for(state="visible")
    assert "Error 400" in error.inner_text() and "max_tokens" in error.inner_text()
    # The user can carry on: the failed exchange is not sent back as history.
    page.fill("#max-tokens", "5")
    ask(page, "Hello")
    wait_answered(page)
    assert page.locator(".msg.assistant .error:visible").count() == 1


def test_markdown_reasoning_and_no_html_injection(page):
    """A stored conversation renders markdown, keeps <think> collapsible, runs no script."""
    reply = ("<think>Weigh **both** options.</think>Here:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
             "- one\n- two\n\n```python\nprint('hi')\n```\n\n"
             "<img src=x onerror=\"window.pwned=1\"> [x](javascript:window.pwned=2) "
             "<script>window.pwned=3</script>")
    conversation = {"messages": [{"role": "user", "content": "show me <b>bold</b>"},
                                 {"role": "assistant", "content": reply}],
                    "system": "", "temperature": 0.7, "maxTokens": 64}
    page.evaluate("c => localStorage.setItem('cake.chat', JSON.stringify(c))", conversation)
    page.reload()
    msg = page.locator(".msg.assistant")
    assert msg.locator("table td").all_inner_texts() == ["1", "2"]
    assert msg.locator("ul li").all_inner_texts() == ["one", "two"]
    assert msg.locator("pre code").inner_text().strip() == "print('hi')"
    reasoning = msg.locator("details.reasoning")
    assert reasoning.get_attribute("open") is None  # collapsed once the answer is there
    assert "Weigh both options" not in msg.locator(".content").inner_text()
    reasoning.locator("summary").click()
    assert reasoning.locator("strong").inner_text() == "both"
    assert page.locator(".msg.user").inner_text().endswith("show me <b>bold</b>")
    assert "<script>" in msg.locator(".content").inner_text()  # shown as text
    assert msg.locator("img, script").count() == 0
    assert msg.locator("a[href^='javascript']").count() == 0
    page.click("a:has-text('x')")
    assert page.evaluate("window.pwned") is None


def test_cluster_tab_expands_layers_and_keeps_them_open(browser, default_server, page):
    page.clock.install()  # the 10 s refresh, fast-forwarded
    page.reload()
    topology_requests = []
    page.on("request", lambda r: "/api/v1/topology" in r.url and topology_requests.append(r))
    page.click("[data-tab=cluster]")
    node = page.locator(".node")
    node.wait_for()
    assert node.count() == 1  # one machine: the master alone
    assert "master" in node.locator("header").inner_text()
    assert node.locator(".status").inner_text() == "ready"
    assert node.locator(".layer-range").inner_text() == "0–29 (30 layers)"
    assert re.fullmatch(r"[\d.]+ MiB / [\d.]+ GiB", node.locator(".memtext").inner_text())
    node.locator("details.layers > summary").click()
    layer = node.locator("details.layer[data-layer='model.layers.3']")
    layer.locator("summary").click()
    topology = httpx.get(default_server.url + "/api/v1/topology").json()
    tensors = topology["layer_details"]["model.layers.3"]["tensors"]
    rows = layer.locator("table.tensors tbody tr")
    assert [rows.nth(i).locator("td").all_inner_texts()[:3] for i in range(rows.count())] == [
        [t["short_name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]"]
        for t in tensors]
    before = len(topology_requests)
    page.clock.fast_forward(11_000)
    deadline = time.monotonic() + 10
    while len(topology_requests) == before and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert len(topology_requests) > before  # it refreshed…
    page.wait_for_load_state("networkidle")
    layer = page.locator("details.layer[data-layer='model.layers.3']")
    assert layer.get_attribute("open") is not None  # …and what was open stayed open
    assert page.locator("details.layer[open]").count() == 1
