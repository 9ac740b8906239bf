"""Image and speech endpoints. They answer only when a model of their type is loaded; a
text server returns the spec's 404 JSON for them."""
from __future__ import annotations

from fastapi import APIRouter, Request

from cake.server.errors import APIError

router = APIRouter()


@router.post("/v1/images/generations")
@router.post("/api/v1/image")
async def images(request: Request):
    if request.app.state.cake.image is None:
        raise APIError(404, "No image model loaded")
    raise APIError(501, "image generation is not implemented yet")


@router.post("/v1/audio/speech")
async def speech(request: Request):
    if request.app.state.cake.audio is None:
        raise APIError(404, "No audio model loaded")
    raise APIError(501, "speech generation is not implemented yet")
