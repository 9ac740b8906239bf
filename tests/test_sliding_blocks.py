"""A model whose every layer slides (a tiny Mistral, window 32) gives its blocks back as they
leave the window: on a long generation /health shows a few blocks in use, not one per 16
positions, and the text is what the same engine writes keeping every block."""
from __future__ import annotations

import threading

import httpx
import openai

from conftest import write_tiny_model

from cake.text.sampling import SamplingParams
from cake.text.serving import load_text_model

WINDOW, NEW = 32, 200


def test_blocks_behind_the_window_go_back_and_the_text_is_unchanged(start_server, tmp_path):
    folder = write_tiny_model(tmp_path / "mistral", "mistral", sliding_window=WINDOW,
                              max_position_embeddings=1024)
    server = start_server(str(folder), "--temperature", "0", "--ctx-size", "1024",
                          "--max-batch", "2")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
    prompt = list(range(1000, 1040))  # 40 token ids: 3 blocks of prompt
    pieces, used = [], []
    for i, chunk in enumerate(client.completions.create(model="x", prompt=prompt,
                                                        max_tokens=NEW, stream=True)):
        pieces.append(chunk.choices[0].text if chunk.choices else "")
        if i % 10 == 5:
            used.append(httpx.get(server.url + "/health", timeout=10).json()["engine"]
                        ["kv_blocks_used"])
    text = "".join(pieces)
    assert len(used) > 10
    # The window plus the block being written and one partly behind it: 4 blocks of 16,
    # where keeping every position would need (40 + 200) / 16 = 15.
    assert max(used) <= WINDOW // 16 + 2

    # The reference: the same engine in this process with every block kept.
    model = load_text_model(folder, "ref", device="cpu", max_batch=2, context_length=1024)
    try:
        assert model.engine.window == WINDOW  # what the server frees by
        model.engine.window = None
        events = []
        done = threading.Event()

        def on_output(out):
            events.append(out)
            if out.finished:
                done.set()

        model.engine.submit(prompt, SamplingParams(temperature=0, max_tokens=NEW), on_output)
        assert done.wait(300)
        assert events[-1].completion_tokens > 100
        assert "".join(e.text for e in events) == text
        assert model.engine.stats()["preemptions"] == 0
    finally:
        model.engine.shutdown()
