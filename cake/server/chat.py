"""POST /v1/chat/completions (and the /api/v1 alias): OpenAI chat, blocking or streamed."""
from __future__ import annotations

import asyncio
import json

from pydantic import ValidationError

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from cake.server import schemas
from cake.server.disconnect import result_unless_gone
from cake.server.errors import APIError
from cake.text.engine import Output
from cake.text.sampling import validate
from cake.text.tokenizer import TemplateError

router = APIRouter()


class OutputQueue:
    """Carries engine outputs (engine thread) into the request's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()

    def put(self, out: Output) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def get(self) -> Output:
        return await self.queue.get()


def build_prompt(text_model, req: schemas.ChatCompletionRequest) -> list[int]:
    messages = []
    for m in req.messages:
        if m.role not in schemas.ROLES:
            raise APIError(400, f"unknown role {m.role!r}; expected one of {', '.join(schemas.ROLES)}")
        try:
            content = m.text()
        except ValueError as e:
            raise APIError(400, str(e))
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        ids = text_model.tokenizer.encode_chat(messages)
    except TemplateError as e:
        raise APIError(400, f"cannot render the chat template: {e}")
    if len(ids) >= text_model.context_length:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context holds "
                            f"{text_model.context_length}, leaving no room to answer")
    return ids


def sampling_params(text_model, req: schemas.ChatCompletionRequest):
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    params = text_model.params(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        stop=[s for s in stop if s] if stop else None)
    try:
        validate(params)
    except ValueError as e:
        raise APIError(400, str(e))
    return params


@router.post("/v1/chat/completions")
@router.post("/api/v1/chat/completions")
async def chat_completions(request: Request):
    state = request.app.state.cake
    if state.text is None:  # the spec's 404 comes before any look at the body
        raise APIError(404, "No text model loaded")
    text_model = state.text
    try:
        req = schemas.ChatCompletionRequest.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors())
    prompt = build_prompt(text_model, req)
    params = sampling_params(text_model, req)
    outputs = OutputQueue()
    seq = text_model.engine.submit(prompt, params, outputs.put)
    meta = (schemas.completion_id(), schemas.now(), text_model.model_id)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(stream(seq, outputs, meta, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await blocking(seq, outputs, meta, request)


async def blocking(seq, outputs: OutputQueue, meta, request: Request):
    async def collect():
        parts = []
        while True:
            out = await outputs.get()
            parts.append(out.text)
            if out.finished:
                return "".join(parts), out

    text, last = await result_unless_gone(request, collect(), seq.cancel)
    if last.finish_reason == "error":
        raise APIError(500, last.error or "inference failed")
    return schemas.completion(*meta, text, last.finish_reason, last.prompt_tokens,
                              last.completion_tokens)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def stream(seq, outputs: OutputQueue, meta, include_usage: bool):
    try:
        yield sse(schemas.chunk(*meta, {"role": "assistant"}))
        while True:
            out = await outputs.get()
            if out.finish_reason == "error":
                yield sse({"error": out.error or "inference failed"})
                return
            if out.text:
                yield sse(schemas.chunk(*meta, {"content": out.text}))
            if out.finished:
                yield sse(schemas.chunk(*meta, {}, out.finish_reason))
                if include_usage:
                    yield sse(schemas.chunk(*meta, None, usage=schemas.usage(
                        out.prompt_tokens, out.completion_tokens)))
                yield sse("[DONE]")
                return
    finally:
        seq.cancel()  # no-op when finished; frees the slot when the client went away
