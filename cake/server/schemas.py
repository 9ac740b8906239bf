"""OpenAI wire format for chat completions (requests and responses).

Strict types (a string is not a number), unknown fields accepted and ignored: clients send
user, logprobs, tools, response_format and more that we do not act on.
"""
from __future__ import annotations

import time
import uuid
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "developer", "user", "assistant")


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(WireModel):
    type: str
    text: Optional[str] = None


class ChatMessage(WireModel):
    role: str
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        """The content as one string; only text parts are understood by a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content part of type {part.type!r} is not supported; "
                                 "only 'text' parts are")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(WireModel):
    include_usage: bool = False


class ChatCompletionRequest(WireModel):
    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    n: int = Field(default=1, ge=1, le=1)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, text: str, finish_reason: str,
               prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(id: str, created: int, model: str, delta: dict | None,
          finish_reason: str | None = None, usage: dict | None = None) -> dict:
    """A chat.completion.chunk; delta None makes the usage-only chunk (empty choices)."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else
           [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if usage is not None:
        out["usage"] = usage
    return out
