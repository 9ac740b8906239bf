"""POST /v1/completions: OpenAI's legacy text completions (what lm-eval's local-completions
drives): a prompt string, token list or a batch of either; stream; logprobs; echo (the prompt
scored too, so max_tokens 0 with echo and logprobs gives a prompt's loglikelihood)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from cake.server import metrics, schemas
from cake.server.chat import (cancel_all, check_length, failure, parse_body, sampling_params,
                              per_choice, sse)
from cake.server.events import EventQueue
from cake.server.disconnect import result_unless_gone
from cake.server.errors import APIError, busy
from cake.text.engine import QueueFull

router = APIRouter()


def prompt_list(prompt) -> list:
    """A string, token ids, or a list of either -> a list of prompts."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty")
    return prompt


def prompts(text_model, prompt) -> list[list[int]]:
    """The request's prompts as token lists."""
    vocab = text_model.engine.vocab_size
    out = []
    for p in prompt_list(prompt):
        ids = text_model.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p
        if not ids:
            raise APIError(400, "a prompt has no tokens")
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})")
        check_length(text_model, ids)
        out.append(ids)
    return out


class Scores:
    """OpenAI's completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset
        self.doc = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token: int, logprob, top) -> dict:
        text = self.tokenizer.token_bytes(token).decode("utf-8", errors="replace")
        part = {"tokens": [text], "token_logprobs": [logprob], "text_offset": [self.offset],
                "top_logprobs": [None if top is None else {
                    self.tokenizer.token_bytes(i).decode("utf-8", errors="replace"): v
                    for i, v in top}]}
        self.offset += len(text)
        for k, v in part.items():
            self.doc[k] += v
        return part

    def add_all(self, prompt_ids, prompt_entries, entries) -> dict:
        """What one output event adds: the prompt's entries (echo), then generated tokens'."""
        part = {k: [] for k in self.doc}
        if prompt_entries is not None:
            for token, entry in zip(prompt_ids, prompt_entries):
                one = self.add(token, None, None) if entry is None else \
                    self.add(token, entry[1], entry[2])
                for k, v in one.items():
                    part[k] += v
        for token, lp, top in entries:
            for k, v in self.add(token, lp, top).items():
                part[k] += v
        return part


@router.post("/v1/completions", openapi_extra=schemas.body_doc(schemas.CompletionRequest))
async def completions(request: Request):
    state = request.app.state.cake
    if state.text is None:
        raise APIError(404, "No text model loaded")
    text_model = state.text
    req = parse_body(schemas.CompletionRequest, await request.body(), "completions")
    batch = prompts(text_model, req.prompt)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens 0 needs echo: true (nothing would be answered)")
    params = sampling_params(text_model, req, req.max_tokens, req.logprobs, min_tokens=0)
    score_prompt = req.logprobs if req.echo and req.logprobs is not None else None
    outputs = EventQueue(state)
    seqs = []
    try:
        for p, ids in enumerate(batch):
            callbacks = [outputs.put_for(p * req.n + j) for j in range(req.n)]
            if req.n > 1 and score_prompt is None:  # the choices share the prompt's prefill
                seqs += text_model.engine.submit_choices(ids, per_choice(params, req.n),
                                                         callbacks)
                continue
            for choice_params, callback in zip(per_choice(params, req.n), callbacks):
                seqs.append(text_model.engine.submit(ids, choice_params, callback,
                                                     prompt_logprobs=score_prompt))
    except ValueError as e:
        cancel_all(seqs)()
        raise APIError(400, str(e))
    except QueueFull as e:
        cancel_all(seqs)()
        raise busy(e)
    # echo gives a text prompt back as sent, token ids as their text
    echoes = [(p if isinstance(p, str) else text_model.tokenizer.decode(ids)) if req.echo
              else "" for p, ids in zip(prompt_list(req.prompt), batch) for _ in range(req.n)]
    run = Run(text_model, seqs, req.n, [ids for ids in batch for _ in range(req.n)], echoes,
              req.logprobs is not None, outputs,
              metrics.RequestTimer(metrics.of(request), text_model.model_id))
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(run.stream(include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await result_unless_gone(request, run.blocking(), cancel_all(seqs))


class Run:
    def __init__(self, text_model, seqs, n, prompt_ids, echoes, logprobs, outputs, timer):
        self.seqs, self.n, self.prompt_ids, self.echoes = seqs, n, prompt_ids, echoes
        self.outputs, self.timer = outputs, timer
        self.id, self.created = schemas.completion_id("cmpl"), schemas.now()
        self.model = text_model.model_id
        tok = text_model.tokenizer
        self.scores = [Scores(tok) if logprobs else None for _ in seqs]
        self.finished: dict = {}

    def envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def events(self):
        """(index, text, logprobs part, output) per engine event, echo first."""
        sent_echo = set()
        while len(self.finished) < len(self.seqs):
            i, out = await self.outputs.get()
            self.timer.output()
            if out.finish_reason == "error":
                raise failure(out, self.seqs[i], "/v1/completions")
            text = out.text
            if i not in sent_echo:
                sent_echo.add(i)
                text = self.echoes[i] + text
            part = None
            if self.scores[i] is not None:
                part = self.scores[i].add_all(self.prompt_ids[i], out.prompt_logprobs,
                                              out.logprobs)
            if out.finished:
                self.finished[i] = out
            yield i, text, part, out

    def usage(self) -> dict:
        done = self.finished.items()  # a prompt's tokens count once, whatever n
        prompt = sum(o.prompt_tokens for i, o in done if i % self.n == 0)
        cached = sum(o.cached_tokens for i, o in done if i % self.n == 0)
        return schemas.usage(prompt, sum(o.completion_tokens for _, o in done), cached)

    def _finish_metrics(self) -> dict:
        usage = self.usage()
        self.timer.finished(self.finished[0].finish_reason, usage["prompt_tokens"],
                            usage["completion_tokens"])
        return usage

    async def blocking(self) -> dict:
        texts = [[] for _ in self.seqs]
        async for i, text, _, _ in self.events():
            texts[i].append(text)
        choices = [{"index": i, "text": "".join(texts[i]),
                    "logprobs": self.scores[i].doc if self.scores[i] else None,
                    "finish_reason": self.finished[i].finish_reason}
                   for i in range(len(self.seqs))]
        return self.envelope(choices, self._finish_metrics())

    async def stream(self, include_usage: bool):
        try:
            async for i, text, part, out in self.events():
                if text or part and part["tokens"] or out.finished:
                    yield sse(self.envelope([{"index": i, "text": text, "logprobs": part,
                                              "finish_reason": out.finish_reason}]))
            usage = self._finish_metrics()
            if include_usage:
                yield sse(self.envelope([], usage))
            yield sse("[DONE]")
        except APIError as e:
            yield sse({"error": e.message})
        finally:
            cancel_all(self.seqs)()
