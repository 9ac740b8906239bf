"""POST /v1/chat/completions (and the /api/v1 alias): OpenAI chat, blocking or streamed,
with tools, structured output, logprobs and n choices."""
from __future__ import annotations

import dataclasses
import json

from pydantic import ValidationError

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from cake.server import metrics, schemas, tools
from cake.server.disconnect import result_unless_gone
from cake.server.errors import APIError, busy, internal_error
from cake.server.events import EventQueue
from cake.text import grammar
from cake.text.engine import Output, QueueFull
from cake.text.sampling import validate
from cake.text.tokenizer import TemplateError

router = APIRouter()


def parse_body(request_model, body: bytes, kind: str):
    try:
        req = request_model.model_validate_json(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors())
    raw = json.loads(body)
    for name in schemas.UNSUPPORTED.get(kind, ()):
        if raw.get(name) is not None:
            raise APIError(400, f"{name} is not supported by this server")
    if raw.get("modalities") not in (None, ["text"]):
        raise APIError(400, "modalities: this server answers text only")
    return req


@dataclasses.dataclass
class ToolSetup:
    """What a request's tools mean for this model: how calls are written and parsed."""

    family: str
    names: set
    forced: bool  # tool_choice "required" or a named function: the grammar makes the call
    parallel: bool


def tool_setup(text_model, req) -> tuple[ToolSetup | None, list[dict], str | None]:
    """(tool setup, tools for the template, the forcing grammar) for a request."""
    choice = req.tool_choice or ("auto" if req.tools else "none")
    listed = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if choice != "none" and not listed:
        raise APIError(400, "tool_choice needs tools")
    if choice == "none":
        return None, [], None
    names = [t["function"]["name"] for t in listed]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: function names must be unique")
    template = text_model.tokenizer.chat_template
    fam = tools.family(template)
    chosen = listed
    if isinstance(choice, schemas.NamedToolChoice):
        chosen = [t for t in listed if t["function"]["name"] == choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not "
                                "among the tools")
    forced = choice != "auto"
    parallel = req.parallel_tool_calls and not isinstance(choice, schemas.NamedToolChoice)
    gram = None
    if forced:
        marker = text_model.tokenizer.tok.token_to_id(tools.MARKERS.get(fam, ""))
        try:
            gram = tools.forced_grammar(fam, chosen, parallel, marker)
        except ValueError as e:
            raise APIError(400, f"tools: {e}")
        check_grammar(text_model, gram, "tools")
    return ToolSetup(fam, set(names), forced, parallel), listed, gram


def check_grammar(text_model, gram: str, field: str) -> None:
    try:
        tokenizer = grammar.guidance_tokenizer(text_model.tokenizer, text_model.engine.vocab_size)
    except Exception as e:  # a tokenizer llguidance cannot read: no constrained decoding
        raise APIError(400, f"{field}: constrained decoding is not available for this "
                            f"model's tokenizer: {e}")
    problem = grammar.check(gram, tokenizer)
    if problem:
        raise APIError(400, f"{field}: cannot be enforced: {problem}")


def format_grammar(text_model, fmt: schemas.ResponseFormat | None) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        gram = grammar.json_object_grammar()
    else:
        if fmt.json_schema is None:
            raise APIError(400, "response_format: json_schema needs a json_schema object")
        try:
            gram = grammar.json_schema_grammar(fmt.json_schema.schema_)
        except ValueError as e:
            raise APIError(400, f"response_format: {e}")
    check_grammar(text_model, gram, "response_format")
    return gram


def build_prompt(text_model, req: schemas.ChatCompletionRequest, listed: list[dict],
                 setup: ToolSetup | None) -> list[int]:
    messages = []
    for m in req.messages:
        if m.role not in schemas.ROLES:
            raise APIError(400, f"unknown role {m.role!r}; expected one of {', '.join(schemas.ROLES)}")
        try:
            content = m.text()
        except ValueError as e:
            raise APIError(400, str(e))
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            message["content"] = content or None
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            message["name"] = m.name
        messages.append(message)
    template = text_model.tokenizer.chat_template
    knows = tools.template_knows_tools(template)
    messages = tools.template_messages(messages, knows)
    extra = {}
    if setup is not None and knows:
        extra["tools"] = listed
    elif setup is not None:
        messages = tools.add_system_prompt(messages, tools.system_prompt(listed))
    try:
        ids = text_model.tokenizer.encode_chat(messages, **extra)
    except TemplateError as e:
        raise APIError(400, f"cannot render the chat template: {e}")
    check_length(text_model, ids)
    return ids


def check_length(text_model, ids: list[int]) -> None:
    if len(ids) >= text_model.context_length:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context holds "
                            f"{text_model.context_length}, leaving no room to answer")


def sampling_params(text_model, req, max_tokens, logprobs, grammar_=None, min_tokens=1):
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= text_model.engine.vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model")
        bias[int(key)] = value
    params = text_model.params(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        max_tokens=max_tokens, stop=[s for s in stop if s] if stop else None,
        logprobs=logprobs, logit_bias=bias or None, grammar=grammar_)
    try:
        validate(params, min_tokens)
    except ValueError as e:
        raise APIError(400, str(e))
    return params


def per_choice(params, n: int) -> list:
    """n choices: with a seed, choice i draws from seed + i (else all would be equal)."""
    return [params if params.seed is None or i == 0 else
            dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def submit(text_model, prompt, params, n, outputs: EventQueue, **kwargs):
    try:
        if n == 1:
            return [text_model.engine.submit(prompt, params, outputs.put_for(0), **kwargs)]
        return text_model.engine.submit_choices(prompt, per_choice(params, n),
                                                [outputs.put_for(i) for i in range(n)])
    except ValueError as e:
        raise APIError(400, str(e))
    except QueueFull as e:
        raise busy(e)


def failure(out: Output, seq, where: str) -> APIError:
    """The engine's failure as a 500: its stack is in the log under the sequence's id."""
    what = out.error or "inference failed"
    return internal_error(what, where, f"{what} (sequence {seq.id})")


def cancel_all(seqs):
    return lambda: [s.cancel() for s in seqs]


@router.post("/v1/chat/completions", openapi_extra=schemas.body_doc(schemas.ChatCompletionRequest))
@router.post("/api/v1/chat/completions", include_in_schema=False)
async def chat_completions(request: Request):
    state = request.app.state.cake
    if state.text is None:  # the spec's 404 comes before any look at the body
        raise APIError(404, "No text model loaded")
    text_model = state.text
    req = parse_body(schemas.ChatCompletionRequest, await request.body(), "chat")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true")
    setup, listed, gram = tool_setup(text_model, req)
    fmt = format_grammar(text_model, req.response_format)
    if fmt is not None and gram is not None:
        raise APIError(400, "response_format and a forced tool_choice cannot both shape the "
                            "answer")
    prompt = build_prompt(text_model, req, listed, setup)
    params = sampling_params(text_model, req, req.max_completion_tokens or req.max_tokens,
                             (req.top_logprobs or 0) if req.logprobs else None, gram or fmt)
    if setup is not None and setup.family in tools.SPECIAL_MARKERS:
        params.skip_special_tokens = False  # the parser reads the family's marker token
    outputs = EventQueue(state)
    seqs = submit(text_model, prompt, params, req.n, outputs)
    meta = (schemas.completion_id(), schemas.now(), text_model.model_id)
    timer = metrics.RequestTimer(metrics.of(request), text_model.model_id)
    answer = Answer(text_model.tokenizer, setup, req.logprobs)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream(seqs, outputs, meta, include_usage, answer, timer),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await blocking(seqs, outputs, meta, request, answer, timer)


class Answer:
    """How one request's outputs become OpenAI messages, deltas and logprobs."""

    def __init__(self, tokenizer, setup: ToolSetup | None, logprobs: bool):
        self.tokenizer, self.setup, self.logprobs = tokenizer, setup, logprobs

    def entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
                "bytes": list(raw)}

    def logprob_content(self, entries) -> list[dict]:
        return [{**self.entry(t, lp), "top_logprobs": [self.entry(i, v) for i, v in top]}
                for t, lp, top in entries]

    def message(self, text: str, reason: str) -> tuple[dict, str]:
        if self.setup is not None and reason == "stop":
            content, calls = tools.parse(text, self.setup.family, self.setup.names)
            if calls:
                if not self.setup.parallel:
                    calls = calls[:1]
                return ({"role": "assistant", "content": content,
                         "tool_calls": [c.wire(tools.call_id()) for c in calls]}, "tool_calls")
        return {"role": "assistant", "content": text}, reason

    def stream_parser(self) -> tools.StreamParser | None:
        if self.setup is None:
            return None
        return tools.StreamParser(self.setup.family, self.setup.names, self.setup.forced,
                                  self.setup.parallel)


async def blocking(seqs, outputs: EventQueue, meta, request: Request, answer: Answer, timer):
    async def collect():
        parts = [[] for _ in seqs]
        logprobs = [[] for _ in seqs]
        last: dict[int, Output] = {}
        while len(last) < len(seqs):
            i, out = await outputs.get()
            timer.output()
            parts[i].append(out.text)
            logprobs[i] += out.logprobs
            if out.finished:
                last[i] = out
        return parts, logprobs, last

    parts, logprobs, last = await result_unless_gone(request, collect(), cancel_all(seqs))
    for i, out in last.items():
        if out.finish_reason == "error":
            raise failure(out, seqs[i], request.url.path)
    choices = []
    for i in range(len(seqs)):
        message, reason = answer.message("".join(parts[i]), last[i].finish_reason)
        lp = {"content": answer.logprob_content(logprobs[i]), "refusal": None} \
            if answer.logprobs else None
        choices.append(schemas.choice(i, message, reason, lp))
    prompt_tokens = last[0].prompt_tokens
    completion_tokens = sum(o.completion_tokens for o in last.values())
    timer.finished(choices[0]["finish_reason"], prompt_tokens, completion_tokens)
    return schemas.completion(*meta, choices, schemas.usage(prompt_tokens, completion_tokens,
                                                            last[0].cached_tokens))


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream(seqs, outputs: EventQueue, meta, include_usage: bool, answer: Answer, timer):
    n = len(seqs)
    parsers = [answer.stream_parser() for _ in seqs]
    finished: dict[int, Output] = {}
    try:
        for i in range(n):
            yield sse(schemas.chunk(*meta, {"role": "assistant"}, index=i))
        while len(finished) < n:
            i, out = await outputs.get()
            timer.output()
            if out.finish_reason == "error":
                yield sse({"error": failure(out, seqs[i], "a chat stream").message})
                return
            lp = {"content": answer.logprob_content(out.logprobs), "refusal": None} \
                if answer.logprobs and out.logprobs else None
            deltas = parsers[i].feed(out.text) if parsers[i] else \
                ([{"content": out.text}] if out.text else [])
            reason = out.finish_reason
            if out.finished and parsers[i] is not None:
                last, called = parsers[i].finish()
                deltas += last
                if called and reason == "stop":
                    reason = "tool_calls"
            if lp and not deltas:
                deltas = [{"content": ""}]
            for k, delta in enumerate(deltas):
                yield sse(schemas.chunk(*meta, delta, index=i, logprobs=lp if k == 0 else None))
            if out.finished:
                finished[i] = out
                yield sse(schemas.chunk(*meta, {}, reason, index=i))
        prompt_tokens = finished[0].prompt_tokens
        completion_tokens = sum(o.completion_tokens for o in finished.values())
        timer.finished(finished[0].finish_reason, prompt_tokens, completion_tokens)
        if include_usage:
            yield sse(schemas.chunk(*meta, None, usage=schemas.usage(
                prompt_tokens, completion_tokens, finished[0].cached_tokens)))
        yield sse("[DONE]")
    except APIError as e:  # the server stops before this stream could end
        yield sse({"error": e.message})
    finally:
        for seq in seqs:
            seq.cancel()  # no-op when finished; frees the slot when the client went away
