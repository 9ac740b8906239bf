"""POST /v1/embeddings: the loaded model's final hidden state at the last token (the pooling
decoder embedders such as Qwen3-Embedding are trained with), L2-normalized; float or base64.
POST /tokenize and /detokenize, as llama.cpp's server has them."""
from __future__ import annotations

import base64

import torch
from fastapi import APIRouter, Request

from cake.server import schemas
from cake.server.chat import cancel_all, failure, parse_body
from cake.server.events import EventQueue
from cake.server.completions import prompts
from cake.server.disconnect import result_unless_gone
from cake.server.errors import APIError, busy
from cake.text.engine import QueueFull

router = APIRouter()


def text_model_of(request: Request):
    text_model = request.app.state.cake.text
    if text_model is None:
        raise APIError(404, "No text model loaded")
    return text_model


@router.post("/v1/embeddings", openapi_extra=schemas.body_doc(schemas.EmbeddingRequest))
async def embeddings(request: Request):
    text_model = text_model_of(request)
    req = parse_body(schemas.EmbeddingRequest, await request.body(), "embeddings")
    batch = prompts(text_model, req.input)
    outputs = EventQueue(request.app.state.cake)
    params = text_model.params(max_tokens=1)
    seqs = []
    try:
        for i, ids in enumerate(batch):
            seqs.append(text_model.engine.submit(ids, params, outputs.put_for(i), embed=True))
    except QueueFull as e:
        cancel_all(seqs)()
        raise busy(e)

    async def collect():
        vectors = {}
        while len(vectors) < len(seqs):
            i, out = await outputs.get()
            if out.finish_reason == "error" or out.embedding is None:
                raise failure(out, seqs[i], request.url.path)
            vectors[i] = out.embedding
        return vectors

    vectors = await result_unless_gone(request, collect(), cancel_all(seqs))
    data = []
    for i in range(len(batch)):
        v = torch.tensor(vectors[i], dtype=torch.float32)
        if req.dimensions is not None:  # Matryoshka truncation, as OpenAI's v3 models
            if req.dimensions > v.numel():
                raise APIError(400, f"dimensions must be at most {v.numel()}")
            v = v[:req.dimensions]
        v = torch.nn.functional.normalize(v, dim=0)
        value = base64.b64encode(v.numpy().tobytes()).decode() \
            if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(ids) for ids in batch)
    return {"object": "list", "data": data, "model": text_model.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/tokenize", openapi_extra=schemas.body_doc(schemas.TokenizeRequest))
async def tokenize(request: Request):
    text_model = text_model_of(request)
    req = parse_body(schemas.TokenizeRequest, await request.body(), "tokenize")
    tok = text_model.tokenizer
    ids = tok.encode(req.content, add_special_tokens=req.add_special)
    if not req.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": i, "piece": tok.token_bytes(i).decode("utf-8", errors="replace")}
                       for i in ids]}


@router.post("/detokenize", openapi_extra=schemas.body_doc(schemas.DetokenizeRequest))
async def detokenize(request: Request):
    text_model = text_model_of(request)
    req = parse_body(schemas.DetokenizeRequest, await request.body(), "detokenize")
    vocab = text_model.engine.vocab_size
    if any(not 0 <= t < vocab for t in req.tokens):
        raise APIError(400, f"tokens must be in [0, {vocab})")
    return {"content": text_model.tokenizer.decode(req.tokens, skip_special_tokens=False)}
