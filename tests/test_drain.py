"""SIGTERM drains `cake serve`: new requests get 503, a stream in flight finishes within
--drain-grace (or ends with an error chunk when the grace runs out), and the process exits 0."""
import json
import signal
import time

import httpx
import pytest

from conftest import Server, write_tiny_model

# Special tokens of the default tokenizer banned: the stream runs to max_tokens.
NO_END = {str(i): -100 for i in range(17)}


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("drain") / "model", "llama",
                            max_position_embeddings=8192)


def long_stream(server: Server, max_tokens: int):
    body = {"messages": [{"role": "user", "content": "Count."}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0, "logit_bias": NO_END}
    return httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120)


def events(lines) -> list:
    return [l[6:] for l in lines if l.startswith("data: ")]


def start(model, tmp_path, grace: str) -> Server:
    return Server([str(model), "--drain-grace", grace], tmp_path / "server.log").wait_ready()


def test_sigterm_lets_a_stream_finish_and_refuses_new_requests(long_model, tmp_path):
    server = start(long_model, tmp_path, "120")
    try:
        with long_stream(server, 6000) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(4)]  # the stream is under way
            server.proc.send_signal(signal.SIGTERM)
            for _ in range(200):  # until the signal is handled (polled every 0.5 s)
                probe = httpx.get(server.url + "/v1/models", timeout=10)
                if probe.status_code == 503:
                    break
                time.sleep(0.05)
            assert probe.status_code == 503 and "shutting down" in probe.json()["error"]
            chat = httpx.post(server.url + "/v1/chat/completions", timeout=10,
                              json={"messages": [{"role": "user", "content": "hi"}]})
            assert chat.status_code == 503 and "shutting down" in chat.json()["error"]
            got = events(first + list(lines))
        assert got[-1] == "[DONE]"
        chunks = [json.loads(e) for e in got[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(bool(c["choices"][0]["delta"].get("content")) for c in chunks) > 100
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_a_stream_past_the_grace_ends_with_an_error_chunk(long_model, tmp_path):
    server = start(long_model, tmp_path, "0")
    try:
        with long_stream(server, 8000) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(4)]
            server.proc.send_signal(signal.SIGTERM)
            got = events(first + list(lines))
        last = json.loads(got[-1])
        assert "shutting down" in last["error"]
        assert server.proc.wait(timeout=60) == 0
        assert "ending 1 request(s) still in flight" in server.output()
    finally:
        server.stop()
