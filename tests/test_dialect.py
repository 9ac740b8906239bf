"""The OpenAI dialect clients use, against a real `cake serve` of the embedded default model
(SmolLM2-135M): tool calls, structured output, logprobs, n, logit_bias, /v1/completions,
/v1/embeddings, /tokenize, /metrics, /openapi.json. The model rarely calls tools by itself, so
calls are forced (tool_choice) and the parsers are checked on each family's real syntax."""
from __future__ import annotations

import base64
import json
import struct
import threading
from typing import Annotated, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from cake.server import tools

PARIS = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}, "required": ["zone"]}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: str
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture(scope="module")
def client(default_server):
    return openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path, body):
    return httpx.post(server.url + path, json=body, timeout=120)


# -- tools ----------------------------------------------------------------------------------

@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "get_weather"}}])
def test_forced_tool_call_is_valid_json_of_its_schema(client, choice):
    r = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[TIME, WEATHER],
                                       tool_choice=choice, temperature=0, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    (call,) = c.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
        WeatherArgs.model_validate_json(call.function.arguments)
    else:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)


def test_streamed_tool_call_sends_incremental_arguments(client):
    blocking = client.chat.completions.create(
        model="m", messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=80).choices[0].message.tool_calls[0]
    chunks = list(client.chat.completions.create(
        model="m", messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        temperature=0, max_tokens=80, stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in deltas) and all(d.id is None for d in deltas[1:])
    pieces = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(pieces) > 3  # the arguments arrive as they are written, not at the end
    arguments = "".join(pieces)
    WeatherArgs.model_validate_json(arguments)
    assert json.loads(arguments) == json.loads(blocking.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert all(not c.choices[0].delta.content for c in chunks)


def test_tool_result_round_trip(client):
    first = client.chat.completions.create(model="m", messages=ASK_WEATHER, tools=[WEATHER],
                                           tool_choice="required", temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK_WEATHER, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id,
                "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    final = client.chat.completions.create(model="m", messages=history, tools=[WEATHER],
                                           temperature=0, max_tokens=40)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.choices[0].message.content or final.choices[0].message.tool_calls


def test_tool_choice_none_answers_text(client):
    r = client.chat.completions.create(model="m", messages=PARIS, tools=[WEATHER],
                                       tool_choice="none", temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None
    assert "Paris" in r.choices[0].message.content


def test_langchain_bind_tools_and_structured_output(default_server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=default_server.url + "/v1", api_key="unused", model="m",
                     temperature=0, max_retries=0, max_tokens=80)
    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather"
    WeatherArgs.model_validate(call["args"])

    class Capital(BaseModel):
        country: str
        capital: str

    answer = llm.with_structured_output(Capital, method="json_schema").invoke(
        "What is the capital of France?")
    assert isinstance(answer, Capital)


# -- parsers on each family's real syntax -------------------------------------------------

NAMES = {"get_weather", "get_time"}


@pytest.mark.parametrize("fam, text, content", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
               '"Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
               '"arguments": {"zone": "CET"}}\n</tool_call>', "Let me check."),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
                '"celsius"}}, {"name": "get_time", "arguments": {"zone": "CET"}}]', None),
    ("mistral", ' [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]', None),  # marker decoded away
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                '[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', None),  # v11 tokenizers
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
               '{"name": "get_time", "parameters": {"zone": "CET"}}', None),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": '
               '"celsius"}}; {"name": "get_time", "parameters": {"zone": "CET"}}', None),
    ("json", '```json\n[{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
             '"celsius"}}, {"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}]\n```', None),
])
def test_parse_each_family(fam, text, content):
    got, calls = tools.parse(text, fam, NAMES)
    assert got == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "CET"})]
    # Streamed in small pieces, the deltas rebuild the same calls.
    parser = tools.StreamParser(fam, NAMES, forced=False)
    deltas = [d for i in range(0, len(text), 3) for d in parser.feed(text[i:i + 3])]
    last, called = parser.finish()
    assert called
    rebuilt: dict = {}
    for d in deltas + last:
        for tc in d.get("tool_calls", []):
            entry = rebuilt.setdefault(tc["index"], {"name": "", "arguments": ""})
            entry["name"] += tc.get("function", {}).get("name") or ""
            entry["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert [(e["name"], json.loads(e["arguments"])) for _, e in sorted(rebuilt.items())] == [
        (c.name, json.loads(c.arguments)) for c in calls]
    assert "".join(d.get("content", "") for d in deltas + last).strip() == (content or "")


def test_parallel_tool_calls_false_keeps_the_first_call():
    text = ('<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')
    parser = tools.StreamParser("hermes", NAMES, forced=False, parallel=False)
    deltas = [d for i in range(0, len(text), 5) for d in parser.feed(text[i:i + 5])]
    last, called = parser.finish()
    calls = [tc for d in deltas + last for tc in d.get("tool_calls", [])]
    assert called and {tc["index"] for tc in calls} == {0}
    assert json.loads("".join(tc["function"].get("arguments", "") for tc in calls)) == {
        "zone": "CET"}


def test_parse_leaves_text_and_unknown_tools_alone():
    assert tools.parse("Paris is the capital.", "hermes", NAMES) == ("Paris is the capital.", [])
    odd = '{"name": "launch_rockets", "arguments": {}}'
    assert tools.parse(odd, "json", NAMES) == (odd, [])
    parser = tools.StreamParser("json", NAMES, forced=False)
    sent = "".join(d.get("content", "") for d in parser.feed("{not json at all"))
    last, called = parser.finish()
    assert not called and sent + "".join(d["content"] for d in last) == "{not json at all"


@pytest.mark.parametrize("template, fam", [
    ("{% for tool in tools %}{{ tool | tojson }}{% endfor %}<tool_call>", "hermes"),
    ("[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS][TOOL_CALLS]", "mistral"),
    ("<|start_header_id|>ipython<|end_header_id|> {{ 'parameters' }}", "llama3"),
    ("{{ messages[0]['content'] }}", "json"),
])
def test_family_from_template(template, fam):
    assert tools.family(template) == fam


def test_tools_reach_a_template_that_reads_them(default_tokenizer):
    from cake.text.tokenizer import Tokenizer

    template = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
                "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | "
                "tojson }}</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}"
                "<|im_end|>{% endfor %}")
    tok = Tokenizer(default_tokenizer.tok, template, None, None)
    history = tools.template_messages([
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}], knows_tools=True)
    text = tok.apply_chat_template(history, tools=[WEATHER])
    assert json.dumps(WEATHER) in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text


# -- structured output --------------------------------------------------------------------

def test_json_schema_output_validates_with_pydantic(client):
    # Bounded, so that a 135M model that loops inside a string still ends in time.
    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)
        population: int
        landmarks: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)

    r = client.chat.completions.parse(model="m", messages=[
        {"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        temperature=0, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(r.choices[0].message.parsed, City)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {
            "name": "City", "schema": City.model_json_schema(), "strict": True}},
        temperature=0.8, seed=3, max_tokens=200, stream=True))
    City.model_validate_json(streamed)


def test_json_object_is_bare_json(client):
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Answer in JSON: what is the capital of France?"}],
        response_format={"type": "json_object"}, temperature=0, max_tokens=100)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_constrained_and_free_requests_side_by_side(client):
    alone = client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                           max_tokens=12).choices[0].message.content
    results, errors = {}, []

    def ask(i):
        try:
            kw = {"response_format": {"type": "json_object"}} if i % 2 else {}
            results[i] = client.chat.completions.create(
                model="m", messages=PARIS, temperature=0, max_tokens=12, **kw
            ).choices[0].message.content
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert results[0] == results[2] == alone
    assert results[1].startswith("{")


# -- logprobs, n, logit_bias ----------------------------------------------------------------

def test_logprobs_agree_with_the_greedy_choice(client):
    r = client.chat.completions.create(model="m", messages=PARIS, temperature=0, max_tokens=8,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    ended = r.choices[0].finish_reason == "stop"  # the end token is counted, not shown
    assert len(content) == r.usage.completion_tokens - ended
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token
    chunks = list(client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                                 max_tokens=8, logprobs=True, top_logprobs=3,
                                                 stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in content]


def test_n_choices(client):
    one = client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                         max_tokens=12)
    r = client.chat.completions.create(model="m", messages=PARIS, temperature=0, max_tokens=12,
                                       n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    # The forks start from the first choice's prompt cache: greedy, all equal the single answer.
    assert {c.message.content for c in r.choices} == {one.choices[0].message.content}
    assert r.usage.prompt_tokens == one.usage.prompt_tokens
    assert r.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Tell me a story."}], temperature=1,
        seed=5, max_tokens=16, n=3)
    assert len({c.message.content for c in sampled.choices}) > 1
    chunks = list(client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                                 max_tokens=12, n=2, stream=True))
    for i in range(2):
        text = "".join(c.choices[0].delta.content or "" for c in chunks
                       if c.choices and c.choices[0].index == i)
        assert text == one.choices[0].message.content


def test_logit_bias_steers_the_answer(client, default_tokenizer):
    token = default_tokenizer.encode(" banana")[0]
    r = client.chat.completions.create(model="m", messages=PARIS, temperature=0, max_tokens=3,
                                       logit_bias={str(token): 100})
    assert r.choices[0].message.content.startswith(" banana")


# -- /v1/completions --------------------------------------------------------------------------

def test_completions_blocking_equals_streamed(client):
    kw = dict(model="m", prompt="The capital of France is", max_tokens=10, temperature=0)
    blocking = client.completions.create(**kw)
    assert blocking.object == "text_completion" and blocking.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == blocking.choices[0].text and "Paris" in streamed
    assert blocking.usage.completion_tokens == 10


def test_completions_echo_scores_the_prompt_like_lm_eval(client):
    gen = client.completions.create(model="m", prompt="The capital of France is", max_tokens=1,
                                    temperature=0, logprobs=2)
    word = gen.choices[0].logprobs.tokens[0]
    scored = client.completions.create(model="m", prompt=["The capital of France is" + word, "Hi"],
                                       max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = scored.choices[0]
    assert c.text == "The capital of France is" + word
    assert c.logprobs.token_logprobs[0] is None
    assert c.logprobs.tokens[-1] == word
    # The prompt's last token scores as it did when it was generated.
    assert c.logprobs.token_logprobs[-1] == pytest.approx(gen.choices[0].logprobs.token_logprobs[0],
                                                          abs=1e-3)
    assert c.logprobs.text_offset[-1] == len("The capital of France is")
    assert scored.choices[1].text == "Hi" and scored.usage.completion_tokens == 0


def test_completions_token_prompt_and_n(client, default_tokenizer):
    ids = default_tokenizer.encode("Once upon a time")
    r = client.completions.create(model="m", prompt=ids, max_tokens=6, temperature=0, n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text
    assert r.usage.prompt_tokens == len(ids)


# -- /v1/embeddings, /tokenize ----------------------------------------------------------------

def test_embeddings_deterministic_and_batch_equals_singles(client):
    texts = ["The cat sat on the mat.", "Quantum chromodynamics", "hi"]
    batch = client.embeddings.create(model="m", input=texts)
    assert [d.index for d in batch.data] == [0, 1, 2]
    singles = [client.embeddings.create(model="m", input=t).data[0].embedding for t in texts]
    for d, single in zip(batch.data, singles):
        assert len(d.embedding) == 576
        assert sum(x * x for x in d.embedding) == pytest.approx(1, abs=1e-4)
        assert d.embedding == pytest.approx(single, abs=1e-5)
    again = client.embeddings.create(model="m", input=texts[0]).data[0].embedding
    assert again == singles[0]
    assert singles[0] != pytest.approx(singles[1], abs=1e-2)


def test_embeddings_base64(default_server):
    plain = post(default_server, "/v1/embeddings", {"input": "hello"}).json()["data"][0]
    b64 = post(default_server, "/v1/embeddings", {"input": "hello",
                                                  "encoding_format": "base64"}).json()["data"][0]
    raw = base64.b64decode(b64["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(plain["embedding"])


def test_tokenize_detokenize(default_server, default_tokenizer):
    r = post(default_server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()
    assert [t["id"] for t in r["tokens"]] == default_tokenizer.encode("Hello world")
    assert "".join(t["piece"] for t in r["tokens"]) == "Hello world"
    ids = [t["id"] for t in r["tokens"]]
    assert post(default_server, "/detokenize", {"tokens": ids}).json() == {"content": "Hello world"}


# -- /metrics, /openapi.json ------------------------------------------------------------------

def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def test_metrics_counters_move(client, default_server):
    before = httpx.get(default_server.url + "/metrics").text
    client.chat.completions.create(model="m", messages=PARIS, temperature=0, max_tokens=5)
    after = httpx.get(default_server.url + "/metrics").text
    assert metric(after, "vllm:generation_tokens_total") >= \
        metric(before, "vllm:generation_tokens_total") + 5
    assert metric(after, "vllm:prompt_tokens_total") > metric(before, "vllm:prompt_tokens_total")
    assert metric(after, "vllm:time_to_first_token_seconds_count") == \
        metric(before, "vllm:time_to_first_token_seconds_count") + 1
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:inter_token_latency_seconds_bucket"):
        assert name + "{" in after


def test_openapi_documents_request_bodies(default_server):
    doc = httpx.get(default_server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        name = ref["$ref"].rsplit("/", 1)[1]
        assert name in doc["components"]["schemas"]
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "response_format", "logprobs", "n"} <= set(chat)


# -- what cannot be honoured gets a 400 ---------------------------------------------------------

@pytest.mark.parametrize("extra, fragment", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"n": 9}, "choices"),
])
def test_unhonourable_requests_get_400(default_server, client, extra, fragment):
    r = post(default_server, "/v1/chat/completions", {"messages": PARIS, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]
    assert client.chat.completions.create(model="m", messages=PARIS, temperature=0,
                                          max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "echo"),
    ("/v1/completions", {"prompt": [999999]}, "token ids"),
    ("/v1/completions", {"prompt": []}, "empty"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 100000}, "dimensions"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_other_endpoints_400(default_server, path, body, fragment):
    r = post(default_server, path, body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


# -- a Hermes-style checkpoint (Qwen's template) end to end ----------------------------------

HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

FORECAST = {"type": "function", "function": {"name": "forecast", "parameters": {
    "type": "object", "properties": {
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["unit", "days"]}}}
ALARM = {"type": "function", "function": {"name": "alarm", "parameters": {
    "type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
    "required": ["hour"]}}}


@pytest.fixture(scope="module")
def hermes(start_server, tmp_path_factory):
    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path_factory.mktemp("hermes") / "model", "qwen2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = HERMES_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    server = start_server(str(folder), "--max-batch", "2", "--temperature", "0")
    return server, folder


def test_hermes_checkpoint_gets_tools_and_its_calls_parsed(hermes):
    from cake.text.tokenizer import Tokenizer

    server, folder = hermes
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": "Forecast, then wake me."}]
    # One call: random weights would go on adding calls when several are allowed.
    r = client.chat.completions.create(model="m", messages=messages, tools=[FORECAST, ALARM],
                                       tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=200)
    # The tools reached the checkpoint's template: the prompt is its rendering with them.
    want = Tokenizer.from_dir(folder).encode_chat(messages, tools=[FORECAST, ALARM])
    assert r.usage.prompt_tokens == len(want)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.function.name in ("forecast", "alarm")
    args = json.loads(call.function.arguments)
    assert set(args) == ({"unit", "days"} if call.function.name == "forecast" else {"hour"})
    # Named, streamed, then the result fed back in the template's own format.
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, tools=[FORECAST, ALARM], max_tokens=200, stream=True,
        tool_choice={"type": "function", "function": {"name": "forecast"}}))
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert deltas[0].function.name == "forecast" and 1 <= args["days"] <= 9
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [
        {"id": deltas[0].id, "type": "function",
         "function": {"name": "forecast", "arguments": json.dumps(args)}}]},
        {"role": "tool", "tool_call_id": deltas[0].id, "content": "sunny"}]
    after = client.chat.completions.create(model="m", messages=history, tools=[FORECAST],
                                           max_tokens=5)
    rendered = Tokenizer.from_dir(folder).apply_chat_template(
        tools.template_messages(history, knows_tools=True), tools=[FORECAST])
    assert '<tool_call>\n{"name": "forecast", "arguments": ' + json.dumps(args) in rendered
    assert after.usage.prompt_tokens == len(Tokenizer.from_dir(folder).encode_chat(
        tools.template_messages(history, knows_tools=True), tools=[FORECAST]))


@pytest.mark.parametrize("text", ["  Paris is the capital.", "[a link](http://x) and more text "
                                  "that goes on for long enough to be plainly prose, not JSON",
                                  "{ braces in prose, and no function name anywhere in the first "
                                  "eighty characters of it at all }"])
def test_streamed_text_that_only_looks_like_a_call_flows(text):
    parser = tools.StreamParser("hermes", NAMES, forced=False)
    sent = ""
    for i in range(0, len(text), 4):
        sent += "".join(d.get("content", "") for d in parser.feed(text[i:i + 4]))
    assert len(sent) >= len(text) - 4 - len("<tool_call>")  # not held until the end
    last, called = parser.finish()
    assert not called and sent + "".join(d["content"] for d in last) == text


MISTRAL_TEMPLATE = """{{ bos_token }}{%- for message in messages %}
{%- if message.role == "user" %}
{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
[INST]{{ message.content }}[/INST]
{%- elif message.tool_calls %}[TOOL_CALLS]{{ message.tool_calls | map(attribute="function") | list | tojson }}{{ eos_token }}
{%- elif message.role == "tool" %}[TOOL_RESULTS]{{ message.content }}[/TOOL_RESULTS]
{%- else %}{{ message.content }}{{ eos_token }}
{%- endif %}
{%- endfor %}"""


def test_mistral_marker_token_forced_and_parsed(start_server, tmp_path_factory):
    """[TOOL_CALLS] is one special token: the grammar writes it as that token, and the
    answer keeps it in its text for the parser."""
    from conftest import write_tiny_model
    import tokenizers

    folder = write_tiny_model(tmp_path_factory.mktemp("mistral") / "model", "mistral",
                              vocab_size=49160)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["[TOOL_CALLS]"])
    tok.save(str(folder / "tokenizer.json"))
    marker = tok.token_to_id("[TOOL_CALLS]")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = MISTRAL_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    server = start_server(str(folder), "--max-batch", "2", "--temperature", "0")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    body = dict(model="m", messages=[{"role": "user", "content": "Wake me."}], tools=[ALARM],
                tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    r = client.chat.completions.create(**body, logprobs=True)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "alarm" and 0 <= json.loads(call.function.arguments)["hour"] <= 23
    # The marker came as the single special token, not spelled out in ordinary tokens.
    first = r.choices[0].logprobs.content[0]
    assert first.token == "[TOOL_CALLS]" and len(tok.encode("[TOOL_CALLS]").ids) == 1
    assert marker >= 49152
    chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "alarm"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == json.loads(
        call.function.arguments)
    assert all(not ch.choices[0].delta.content for ch in chunks)
