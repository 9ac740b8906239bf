"""The web UI: GET / serves the one page, /static/* its assets (vendored, no CDN), and
GET /api/v1/info tells the page which model type is loaded so it shows the fitting tabs."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/v1/info")
async def info(request: Request):
    state = request.app.state.cake
    model_type = next((kind for kind in ("text", "image", "audio")
                       if getattr(state, kind) is not None), None)
    return {"model_id": state.model_id, "model_type": model_type}


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
