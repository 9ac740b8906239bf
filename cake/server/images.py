"""Image generation endpoints: OpenAI's /v1/images/generations and Cake's /api/v1/image.
They answer only while an image model is loaded; otherwise the spec's 404 JSON.

A PNG response holds one image: asking for several images as PNG is a 400 that points to
b64_json. A client that disconnects cancels its image at the next denoising step.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import time
from typing import Optional

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import AliasChoices, Field, ValidationError

from cake.server.disconnect import ClientGone, result_unless_gone
from cake.server.errors import APIError, internal_error
from cake.server.events import EventQueue
from cake.server.schemas import WireModel, body_doc

router = APIRouter()
FORMATS = ("png", "b64_json")


class ImageGenerationRequest(WireModel):
    """OpenAI's fields (model, quality, style, user... are accepted and ignored), plus seed."""

    prompt: str
    n: int = 1
    size: Optional[str] = None
    response_format: Optional[str] = None
    seed: Optional[int] = None


def arg(*names: str, default=None):
    return Field(default, validation_alias=AliasChoices(*names))


class ImageArgs(WireModel):
    """Cake's image_args; the older sd- prefixed names are accepted too."""

    prompt: str = arg("prompt", "sd-image-prompt")
    uncond_prompt: str = arg("sd-uncond-prompt", default="")
    n_steps: Optional[int] = arg("n-steps", "sd-n-steps")
    num_samples: int = arg("sd-num-samples", default=1)
    bsize: int = arg("sd-bsize", default=1)
    guidance_scale: Optional[float] = arg("guidance-scale", "sd-guidance-scale")
    image_seed: Optional[int] = arg("image-seed", "sd-seed")
    img2img: Optional[str] = arg("sd-img2img")
    img2img_strength: float = arg("sd-img2img-strength", default=0.8)


class LegacyImageRequest(WireModel):
    image_args: ImageArgs
    response_format: Optional[str] = None


def image_model(request: Request):
    model = request.app.state.cake.image
    if model is None:
        raise APIError(404, "No image model loaded")
    return model


async def parse(request: Request, schema):
    """The body, validated only once we know an image model is loaded (404 comes first)."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors())


def response_format(value: Optional[str], default: str, images: int) -> str:
    fmt = value or default
    if fmt not in FORMATS:
        raise APIError(400, f"response_format {fmt!r} is not supported; use 'png' or 'b64_json'")
    if fmt == "png" and images > 1:
        raise APIError(400, f"{images} images cannot be sent as one PNG; ask for "
                            "response_format 'b64_json'")
    return fmt


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match:
        raise APIError(400, f"size {size!r} is not WIDTHxHEIGHT, e.g. '512x512'")
    return int(match[1]), int(match[2])


def decode_image(data: str):
    """A base64 image (a data: URL too) as a PIL image."""
    from PIL import Image

    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "sd-img2img is not valid base64 (send the image itself, base64 "
                            "encoded; server paths are not read)")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Exception as e:
        raise APIError(400, f"sd-img2img is not an image Pillow can read: {e}")
    return image


def make_job(model, **kwargs):
    try:
        return model.job(**kwargs)
    except ValueError as e:
        raise APIError(400, str(e))


async def render(request: Request, model, job) -> list[bytes]:
    """The job's PNGs; a client that leaves drops its job from the queue or stops it at its
    next denoising step."""
    events = EventQueue(request.app.state.cake)
    model.submit(job, events.put)
    done = await result_unless_gone(request, events.get(), job.cancel)
    if done.reason == "cancelled":
        raise ClientGone()
    if done.reason == "failed":
        raise internal_error("image generation failed", request.url.path, repr(done.error))
    return done.result


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


@router.post("/v1/images/generations", openapi_extra=body_doc(ImageGenerationRequest))
async def generations(request: Request):
    model = image_model(request)
    req = await parse(request, ImageGenerationRequest)
    fmt = response_format(req.response_format, "png", req.n)
    width, height = parse_size(req.size)
    job = make_job(model, prompt=req.prompt, width=width, height=height, seed=req.seed,
                   count=req.n)
    pngs = await render(request, model, job)
    if fmt == "png":
        return Response(pngs[0], media_type="image/png")
    return {"created": int(time.time()), "data": [{"b64_json": b64(p)} for p in pngs]}


@router.post("/api/v1/image", openapi_extra=body_doc(LegacyImageRequest))
async def legacy_image(request: Request):
    model = image_model(request)
    req = await parse(request, LegacyImageRequest)
    a = req.image_args
    if a.num_samples < 1 or a.bsize < 1:
        raise APIError(400, "sd-num-samples and sd-bsize must be at least 1")
    fmt = response_format(req.response_format, "b64_json", a.num_samples * a.bsize)
    job = make_job(model, prompt=a.prompt, negative_prompt=a.uncond_prompt, steps=a.n_steps,
                   guidance=a.guidance_scale, seed=a.image_seed,
                   count=a.num_samples * a.bsize, batch=a.bsize,
                   init_image=decode_image(a.img2img) if a.img2img else None,
                   strength=a.img2img_strength)
    pngs = await render(request, model, job)
    if fmt == "png":
        return Response(pngs[0], media_type="image/png")
    return {"images": [b64(p) for p in pngs]}
