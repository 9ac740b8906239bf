"""Text to speech at /v1/audio/speech. It answers only while a speech model is loaded;
otherwise the spec's 404 JSON.

Synthesis runs on the speech service's worker thread, one request at a time in arrival
order; audio chunks come back to the event loop through a queue, so /v1/models and /health
keep answering meanwhile. A client that disconnects cancels its synthesis.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Literal, Optional

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from cake.jobs import Done
from cake.server.disconnect import result_unless_gone
from cake.server.errors import APIError, internal_error
from cake.server.events import EventQueue, ShuttingDown
from cake.server.schemas import WireModel, body_doc

router = APIRouter()

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm"}


class SpeechBody(WireModel):
    input: str
    model: Optional[str] = None  # ignored: the loaded model answers
    voice: Optional[str] = None
    voice_data: Optional[str] = None
    voice_path: Optional[str] = None
    voice_text: Optional[str] = None  # the words spoken in the voice sample (LuxTTS)
    response_format: Literal["wav", "pcm"] = "wav"
    # Ranges are checked by the speech service (cake/audio/service.py RANGES).
    # None: the model's default (VibeVoice 1.5 and 10, LuxTTS 3 and 4)
    cfg_scale: Optional[float] = None
    max_frames: int = 150
    diffusion_steps: Optional[int] = None
    speed: float = 1.0
    seed: Optional[int] = None
    stream: bool = False


def audio_model(request: Request):
    model = request.app.state.cake.audio
    if model is None:
        raise APIError(404, "No audio model loaded")
    return model


async def parse_body(request: Request) -> SpeechBody:
    # Parsed here rather than by FastAPI so that a server without a speech model answers
    # 404 whatever the body is.
    try:
        payload = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "malformed JSON in request body")
    try:
        return SpeechBody.model_validate(payload)
    except ValidationError as e:
        parts = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"]
                 else err["msg"] for err in e.errors()]
        raise APIError(400, "invalid request: " + "; ".join(parts))


def decode_voice_data(text: str) -> bytes:
    if "," in text[:100] and text.startswith("data:"):  # a data: URL from a browser
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "voice_data is not valid base64")


@router.post("/v1/audio/speech", openapi_extra=body_doc(SpeechBody))
async def speech(request: Request):
    service = audio_model(request)
    body = await parse_body(request)
    voice_data = decode_voice_data(body.voice_data) if body.voice_data is not None else None
    try:
        # Reading a voice sample is file and codec work: keep it off the event loop.
        req = await asyncio.to_thread(
            service.request, body.input, voice=body.voice, voice_data=voice_data,
            voice_path=body.voice_path, voice_text=body.voice_text, cfg_scale=body.cfg_scale,
            max_frames=body.max_frames,
            diffusion_steps=body.diffusion_steps, speed=body.speed, seed=body.seed)
    except ValueError as e:
        raise APIError(400, str(e))
    chunks = EventQueue(request.app.state.cake)
    job = service.submit(req, chunks.put)
    encode = service_encoder(body.response_format)
    headers = {"X-Sample-Rate": str(service.sample_rate)}
    if body.stream:
        return StreamingResponse(stream(job, chunks, encode, body.response_format,
                                        service.sample_rate),
                                 media_type=MEDIA_TYPES[body.response_format], headers=headers)
    return await blocking(job, chunks, body.response_format, service.sample_rate, request, headers)


def service_encoder(fmt: str):
    from cake.audio.audio_io import to_f32le, to_int16

    return to_int16 if fmt == "wav" else to_f32le


async def blocking(job, chunks: EventQueue, fmt: str, rate: int, request: Request, headers):
    import numpy as np

    from cake.audio.audio_io import to_f32le, wav_bytes

    async def collect():
        parts = []
        while not isinstance(event := await chunks.get(), Done):
            parts.append(event)
        return parts, event

    # the client left: its synthesis stops at the next frame
    parts, done = await result_unless_gone(request, collect(), job.cancel)
    if done.reason == "failed":
        raise internal_error("speech synthesis failed", request.url.path, repr(done.error))
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    content = wav_bytes(samples, rate) if fmt == "wav" else to_f32le(samples)
    return Response(content, media_type=MEDIA_TYPES[fmt], headers=headers)


async def stream(job, chunks: EventQueue, encode, fmt: str, rate: int):
    from cake.audio.audio_io import streaming_wav_header

    try:
        if fmt == "wav":
            yield streaming_wav_header(rate)
        while True:
            event = await chunks.get()
            if isinstance(event, Done):
                return  # after a failure too: the status is sent, the log has the error
            yield encode(event)
    except ShuttingDown:
        return  # audio has no error chunk: the stream ends short
    finally:
        job.cancel()  # no-op when finished; stops the synthesis when the client went away
