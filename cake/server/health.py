"""GET /health: 200 once the model is ready (503 while loading), with the queue counters
of whatever is loaded."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    state = request.app.state.cake
    if state.loading is not None:
        return JSONResponse({"status": "loading", "progress": state.load_progress()},
                            status_code=503)
    body = {"status": "ok", "model": state.model_id}
    if state.text is not None:
        body["engine"] = state.text.engine.stats()
    if state.image is not None:
        body["images"] = state.image.stats()
    if state.audio is not None:
        body["speech"] = state.audio.stats()
    return body
