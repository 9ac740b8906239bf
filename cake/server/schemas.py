"""OpenAI wire format: chat and text completions, embeddings, tokenize (requests, responses).

Strict types (a string is not a number). Unknown fields are accepted and ignored, except
those OpenAI defines that we cannot honour: UNSUPPORTED names them and they get a 400.
The request models are what /openapi.json documents.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

ROLES = ("system", "developer", "user", "assistant", "tool")

# OpenAI request fields that would change the answer and that this server does not do.
UNSUPPORTED = {
    "chat": ("functions", "function_call", "audio", "prediction", "web_search_options"),
    "completions": ("best_of", "suffix"),
}


class WireModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ContentPart(WireModel):
    type: str
    text: Optional[str] = None


class ToolCallFunction(WireModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(WireModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(WireModel):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant turn that called tools
    tool_call_id: Optional[str] = None  # a tool's result: which call it answers

    def text(self) -> str:
        """The content as one string; only text parts are understood by a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content part of type {part.type!r} is not supported; "
                                 "only 'text' parts are")
        return "".join(p.text or "" for p in self.content)


class FunctionDefinition(WireModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None  # a JSON schema; absent means no arguments
    strict: Optional[bool] = None


class Tool(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(WireModel):
    name: str = "response"
    description: Optional[str] = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class StreamOptions(WireModel):
    include_usage: bool = False


class SamplingFields(WireModel):
    """What chat and text completions share."""

    model: Optional[str] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    n: int = Field(default=1, ge=1, le=16)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string) -> bias


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    response_format: Optional[ResponseFormat] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=0)  # 0: score the prompt (echo)
    echo: bool = False
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)  # top-k per token


class EmbeddingRequest(WireModel):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1)


class TokenizeRequest(WireModel):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(WireModel):
    tokens: list[int]


DOCUMENTED: list[type[BaseModel]] = []  # request bodies /openapi.json describes


def body_doc(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that reads its body itself (to answer 400, not 422)."""
    DOCUMENTED.append(model)
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def openapi_components() -> dict:
    """The JSON schemas of the documented bodies and of the models they use."""
    out = {}
    for model in DOCUMENTED:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}",
                                         by_alias=True)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """cached_tokens: prompt tokens whose keys and values came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion(id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def choice(index: int, message: dict, finish_reason: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chunk(id: str, created: int, model: str, delta: dict | None,
          finish_reason: str | None = None, usage: dict | None = None, index: int = 0,
          logprobs: dict | None = None) -> dict:
    """A chat.completion.chunk; delta None makes the usage-only chunk (empty choices)."""
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else
           [{"index": index, "delta": delta, "logprobs": logprobs,
             "finish_reason": finish_reason}]}
    if usage is not None:
        out["usage"] = usage
    return out
