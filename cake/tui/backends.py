"""Where `cake chat` gets its answers: a model loaded in this process, or a running
`cake serve` over its OpenAI API. Both stream Pieces and describe the cluster."""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import AsyncIterator, Optional


class BackendError(Exception):
    pass


@dataclass
class Piece:
    text: str = ""
    tokens: Optional[int] = None  # completion tokens so far, when the backend knows them


class LocalBackend:
    """A TextModel in this process (cake.text.serving): its engine runs in its own thread."""

    def __init__(self, model, max_tokens: Optional[int] = None,
                 temperature: Optional[float] = None):
        self.model = model
        self.name = model.model_id
        self.max_tokens, self.temperature = max_tokens, temperature

    async def stream(self, messages: list[dict]) -> AsyncIterator[Piece]:
        from cake.text.tokenizer import TemplateError

        try:
            prompt = self.model.tokenizer.encode_chat(messages)
        except TemplateError as e:
            raise BackendError(f"cannot render the chat template: {e}")
        if len(prompt) >= self.model.context_length:
            raise BackendError(f"the conversation is {len(prompt)} tokens; the context holds "
                               f"{self.model.context_length}: start a new chat")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        params = self.model.params(max_tokens=self.max_tokens, temperature=self.temperature)
        seq = self.model.engine.submit(prompt, params,
                                       lambda out: loop.call_soon_threadsafe(queue.put_nowait, out))
        pieces = 0
        try:
            while True:
                out = await queue.get()
                if out.finish_reason == "error":
                    raise BackendError(out.error or "inference failed")
                pieces += 1  # about a token each; the last output carries the exact count
                yield Piece(out.text, out.completion_tokens if out.finished else pieces)
                if out.finished:
                    return
        finally:
            seq.cancel()  # no-op when finished; frees the slot when the user quit mid-answer

    async def topology(self) -> dict:
        from cake.cluster.topology import cake_shape, text_topology

        return cake_shape(text_topology(self.model.model_id, self.model.engine.pipeline.stages))

    def close(self) -> None:
        self.model.close()


class RemoteBackend:
    """A running cake server (or any OpenAI-compatible one) at `url`."""

    def __init__(self, url: str, api_key: Optional[str] = None,
                 max_tokens: Optional[int] = None, temperature: Optional[float] = None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.name = self.url
        self.max_tokens, self.temperature = max_tokens, temperature

    def client(self):
        """A client per call: the app's event loop owns every connection it opens."""
        import httpx

        return httpx.AsyncClient(base_url=self.url, headers=self.headers,
                                 timeout=httpx.Timeout(30, read=None))

    def connect(self) -> None:
        """Learn the model's name; fail early, with the server's own message."""
        import httpx

        try:
            r = httpx.get(self.url + "/v1/models", headers=self.headers, timeout=30)
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach {self.url}: {e}")
        if r.status_code != 200:
            raise BackendError(error_message(r.status_code, r.content))
        data = r.json().get("data") or []
        if data:
            self.name = data[0]["id"]

    async def stream(self, messages: list[dict]) -> AsyncIterator[Piece]:
        import httpx

        body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        tokens = 0
        try:
            async with self.client() as client, \
                    client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise BackendError(error_message(r.status_code, await r.aread()))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        error = event["error"]
                        raise BackendError(error if isinstance(error, str) else str(error))
                    if event.get("usage"):
                        yield Piece("", event["usage"]["completion_tokens"])
                    for choice in event.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            tokens += 1  # one chunk per token until usage gives the count
                            yield Piece(text, tokens)
        except httpx.HTTPError as e:
            raise BackendError(f"connection to {self.url} failed: {e}")

    async def topology(self) -> dict:
        import httpx

        try:
            async with self.client() as client:
                r = await client.get("/api/v1/topology")
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach {self.url}: {e}")
        if r.status_code != 200:
            raise BackendError(error_message(r.status_code, r.content))
        return r.json()

    def close(self) -> None:
        pass


def error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error if isinstance(error, str) else (error or {}).get("message", "")
    except (ValueError, AttributeError):
        message = body.decode(errors="replace")[:200]
    return f"server error {status}: {message}"
