"""The paged KV cache as clients see it, through real `cake serve` processes of the default
model: a follow-up turn maps the conversation from the prefix cache (and answers as a cold
server does), many streams run together, a full queue answers 429, and a pool too small for
every stream preempts and recomputes instead of failing."""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import openai
import pytest

SYSTEM = ("You are a careful assistant for a small library. " + " ".join(
    f"Rule {i}: books of shelf {i} go back to shelf {i} before closing, and the key of room "
    f"{i} stays at the desk." for i in range(1, 25)))


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()["engine"]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--temperature", "0")


def test_follow_up_turn_maps_the_conversation_and_answers_as_a_cold_server(server,
                                                                           start_server):
    warm = client_of(server)
    first = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": "Where do the books of shelf 7 go?"}]
    r1 = warm.chat.completions.create(model="m", messages=first, max_tokens=30)
    assert r1.usage.prompt_tokens > 400
    assert r1.usage.prompt_tokens_details.cached_tokens == 0  # nothing was cached yet
    follow = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And the key of room 3?"}]
    r2 = warm.chat.completions.create(model="m", messages=follow, max_tokens=30)
    assert r2.usage.prompt_tokens_details.cached_tokens >= 0.9 * r1.usage.prompt_tokens

    cold = client_of(start_server("--temperature", "0"))
    c2 = cold.chat.completions.create(model="m", messages=follow, max_tokens=30)
    assert c2.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.choices[0].message.content == c2.choices[0].message.content
    assert r2.usage.completion_tokens == c2.usage.completion_tokens

    # Streaming: the final usage chunk counts the cached tokens too.
    chunks = list(warm.chat.completions.create(model="m", messages=follow, max_tokens=30,
                                               stream=True,
                                               stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        == c2.choices[0].message.content
    usage = chunks[-1].usage
    assert usage.prompt_tokens == r2.usage.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0.9 * usage.prompt_tokens

    # Completions: a prompt sent twice is mapped the second time.
    done = [warm.completions.create(model="m", prompt=SYSTEM, max_tokens=5) for _ in range(2)]
    assert done[0].choices[0].text == done[1].choices[0].text
    assert done[1].usage.prompt_tokens_details.cached_tokens >= 0.9 * done[1].usage.prompt_tokens

    engine = health(server)
    assert 0 < engine["prefix_cache_hit_rate"] <= 1
    assert engine["prefix_cache_hit_tokens"] > 0 and engine["kv_blocks_cached"] > 0
    assert engine["kv_blocks_used"] == 0 and engine["kv_blocks_total"] > engine["kv_blocks_cached"]


def questions(n: int) -> list[str]:
    return [f"What is {i} plus {i + 3}? Answer in one sentence." for i in range(n)]


def ask(client, question: str, max_tokens: int) -> str:
    chunks = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def together(server, prompts: list[str], max_tokens: int) -> tuple[list[str], int]:
    """Every prompt streamed at once; the answers and the most sequences /health saw running."""
    client = client_of(server)
    most, stop = [0], threading.Event()

    def watch():
        deadline = time.monotonic() + 300
        while not stop.is_set() and time.monotonic() < deadline:
            most[0] = max(most[0], health(server)["running"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            texts = list(pool.map(lambda q: ask(client, q, max_tokens), prompts))
    finally:
        stop.set()
        watcher.join()
    return texts, most[0]


def test_48_streams_run_together_each_as_alone(start_server):
    server = start_server("--temperature", "0")
    prompts = questions(48)
    texts, most = together(server, prompts, 16)
    assert most > 8  # not 8 slots at a time: the KV memory bounds them, and it holds 48
    client = client_of(server)
    assert texts == [ask(client, q, 16) for q in prompts]


def test_a_tiny_pool_preempts_and_recomputes(start_server):
    # 14 blocks of 16 positions: four stories of ~100 positions cannot all fit at once
    server = start_server("--temperature", "0", "--kv-memory", "5MiB", "--max-batch", "4")
    assert health(server)["kv_blocks_total"] == 14
    prompts = [f"Write a long story about a dragon called {name}." for name in
               ("Ash", "Blaze", "Cinder", "Dusk")]
    texts, _ = together(server, prompts, 60)
    assert health(server)["preemptions"] > 0
    client = client_of(server)
    assert texts == [ask(client, q, 60) for q in prompts]


def test_a_full_queue_answers_429(start_server):
    server = start_server("--temperature", "0", "--max-batch", "1", "--max-queue", "1")
    body = {"messages": [{"role": "user", "content": "Count from one to two hundred."}],
            "max_tokens": 400, "stream": True}
    held = []

    def until(key: str, value: int) -> None:
        deadline = time.monotonic() + 60
        while health(server)[key] < value:
            assert time.monotonic() < deadline, f"{key} never reached {value}"
            time.sleep(0.05)

    with httpx.Client(base_url=server.url, timeout=120) as http:
        try:
            for key in ("running", "waiting"):  # one decoding, one queued behind it
                stream = http.stream("POST", "/v1/chat/completions", json=body)
                held.append((stream, stream.__enter__()))
                until(key, 1)
            r = http.post("/v1/chat/completions", json={**body, "stream": False})
            assert r.status_code == 429
            assert r.headers["retry-after"] == "1"
            assert "busy" in r.json()["error"]
            assert health(server)["rejected"] == 1
        finally:
            for stream, _ in held:
                stream.__exit__(None, None, None)
        # the server keeps serving once the queue drains
        deadline = time.monotonic() + 60
        while health(server)["waiting"] or health(server)["running"]:
            assert time.monotonic() < deadline, "the cancelled requests never left"
            time.sleep(0.05)
        ok = http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
        assert ok.status_code == 200


LIST = ", ".join(f"item {i} is a {c}" for i, c in enumerate(
    ["red apple", "green pear", "blue plum", "yellow lemon", "black cherry", "white grape"] * 2))


def test_speculative_greedy_equals_plain_decoding(server, start_server):
    """Prompt-lookup drafts verified in the decode forward: the same greedy text as decoding
    one token at a time, for copy-heavy and free text, alone and in a batch."""
    plain = client_of(start_server("--temperature", "0", "--draft-tokens", "0"))
    spec = client_of(server)
    prompts = [f"Repeat this list exactly, once: {LIST}", "Tell me about the sea.",
               f"Copy this text: {SYSTEM[:400]}"]
    want = [ask(plain, q, 80) for q in prompts]
    before = health(server)["draft_tokens_accepted"]
    assert [ask(spec, q, 80) for q in prompts] == want
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda q: ask(spec, q, 80), prompts)) == want
    assert health(server)["draft_tokens_accepted"] > before


def test_forks_copy_their_shared_block_on_write(server):
    """n sampled choices share the prompt's blocks, its last partial block too, until each
    writes its own tokens there: every choice is what the same seed gives alone."""
    client = client_of(server)
    ask = dict(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
               temperature=1.0, max_tokens=24)
    forked = client.chat.completions.create(**ask, n=3, seed=5)
    alone = [client.chat.completions.create(**ask, seed=5 + i).choices[0].message.content
             for i in range(3)]
    assert [c.message.content for c in forked.choices] == alone
    assert len(set(alone)) > 1
