"""The chat API as a user sees it: a real `cake serve` of the embedded default model, driven
with the official openai client and raw HTTP."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

PARIS = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_blocking_answer_says_paris(client, default_tokenizer):
    r = client.chat.completions.create(model="anything", messages=PARIS, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.role == "assistant"
    # Usage counts are the real token counts of what went in and came out.
    assert r.usage.prompt_tokens == len(default_tokenizer.encode_chat(PARIS))
    generated = default_tokenizer.encode(r.choices[0].message.content)
    assert r.usage.completion_tokens in (len(generated), len(generated) + 1)  # + the end token
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_api_alias_and_content_parts(default_server):
    parts = [{"type": "text", "text": "What is the "}, {"type": "text", "text": "capital of France?"}]
    body = {"messages": [{"role": "user", "content": parts}],
            "temperature": 0, "max_tokens": 20, "user": "someone", "logprobs": False,
            "tools": [], "some_future_field": {"x": 1}}
    r = httpx.post(default_server.url + "/api/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_developer_role_is_a_system_prompt(client):
    def answer(role):
        return client.chat.completions.create(
            model="m", temperature=0, max_tokens=12,
            messages=[{"role": role, "content": "You are a pirate."}, *PARIS],
        ).choices[0].message.content

    assert answer("developer") == answer("system")


def test_length_finish_and_max_completion_tokens(client):
    r = client.chat.completions.create(model="m", messages=PARIS, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                       max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 2


def test_streaming_with_openai_client(client):
    blocking = client.chat.completions.create(model="m", messages=PARIS, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == blocking.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_wire_format_and_include_usage(default_server):
    body = {"messages": PARIS, "stream": True, "temperature": 0, "max_tokens": 4,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert usage_chunk["usage"]["total_tokens"] == (usage_chunk["usage"]["prompt_tokens"] + 4)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert events[-3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}
    # Without include_usage no chunk carries usage.
    body.pop("stream_options")
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        events = sse_events(r)
    assert all("usage" not in e for e in events[:-1]) and events[-1] == "[DONE]"


def test_stop_strings_never_appear(client):
    full = client.chat.completions.create(model="m", messages=PARIS, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text
    cut = client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                         stop=["Paris"])
    assert cut.choices[0].message.content == text[:text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=PARIS, temperature=0, stop=["xyz", "of France"], stream=True))
    assert streamed == text[:text.index("of France")]


def test_seed_reproducible(client):
    def ask(seed):
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.0, top_p=1.0, seed=seed, max_tokens=24,
            extra_body={"top_k": 0, "min_p": 0.0}).choices[0].message.content

    first = ask(1234)
    assert ask(1234) == first
    assert len({ask(s) for s in (1, 2, 3)} | {first}) > 1  # the seed matters


def test_sampling_parameters_accepted(client):
    r = client.chat.completions.create(
        model="m", messages=PARIS, temperature=0.7, top_p=0.9, seed=7, max_tokens=8,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert r.usage.completion_tokens <= 8


def test_concurrent_clients_and_models_during_generation(client, default_server):
    alone = client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                           max_tokens=12).choices[0].message.content
    results, errors = {}, []

    def ask(i):
        try:
            r = client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                               max_tokens=12)
            results[i] = r.choices[0].message.content
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    models = httpx.get(default_server.url + "/v1/models", timeout=5)  # answers meanwhile
    assert models.status_code == 200
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == 6
    assert set(results.values()) == {alone}


def test_models_list(default_server):
    r = httpx.get(default_server.url + "/v1/models")
    assert r.json() == {"object": "list", "data": [
        {"id": "HuggingFaceTB/SmolLM2-135M-Instruct", "object": "model",
         "created": r.json()["data"][0]["created"], "owned_by": "cake"}]}


@pytest.mark.parametrize("body, fragment", [
    ('{"messages": [', "malformed JSON"),
    ('[1, 2]', "invalid request"),
    ('{}', "messages"),
    ('{"messages": []}', "messages"),
    ('{"messages": "hello"}', "messages"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "unknown role"),
    ('{"messages": [{"role": "user"}], "temperature": "hot"}', "temperature"),
    ('{"messages": [{"role": "user", "content": 5}]}', "content"),
    ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    ('{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "stream"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}', "temperature"),
    ('{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "image_url"),
])
def test_bad_requests_get_400_json(default_server, body, fragment):
    r = httpx.post(default_server.url + "/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


def test_prompt_longer_than_context(default_server, client):
    long = "bread " * 9000
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": long}])
    assert e.value.status_code == 400 and "context" in e.value.response.json()["error"]
    # The server keeps serving.
    assert client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                          max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("path, message", [
    ("/v1/images/generations", "No image model loaded"),
    ("/api/v1/image", "No image model loaded"),
    ("/v1/audio/speech", "No audio model loaded"),
])
def test_other_modalities_404(default_server, path, message):
    r = httpx.post(default_server.url + path, json={"prompt": "a cat", "input": "hi"})
    assert r.status_code == 404
    assert r.json() == {"error": message}


def test_unknown_path_404_json(default_server):
    r = httpx.get(default_server.url + "/v2/nothing")
    assert r.status_code == 404
    assert "error" in r.json()


def test_topology_single_machine(default_server):
    doc = httpx.get(default_server.url + "/api/v1/topology").json()
    assert doc["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert doc["num_layers"] == 30 and doc["workers"] == []
    # Cake's shape: layers a list of layer names, tflops a number (measured on this machine).
    assert doc["master"]["layers"] == [f"model.layers.{i}" for i in range(30)]
    assert doc["master"]["layer_range"] == "model.layers.0-29"
    assert isinstance(doc["master"]["tflops"], float) and doc["master"]["tflops"] > 0
    assert doc["master"]["backend"] == "cpu" and doc["master"]["vram_bytes"] > 0
    assert sorted(doc["layer_details"], key=lambda k: int(k.split(".")[2])) == [
        f"model.layers.{i}" for i in range(30)]
    layer0 = doc["layer_details"]["model.layers.0"]
    names = {t["short_name"]: t for t in layer0["tensors"]}
    assert names["self_attn.q_proj.weight"]["shape"] == [576, 576]
    assert names["mlp.up_proj.weight"]["shape"] == [1536, 576]
    assert layer0["total_bytes"] == sum(t["size_bytes"] for t in layer0["tensors"])
    assert doc["memory_bytes"] >= 30 * layer0["total_bytes"]
