"""GET /v1/models: the loaded model in OpenAI's list format."""
from __future__ import annotations

from fastapi import APIRouter, Request

router = APIRouter()


@router.get("/v1/models")
@router.get("/api/v1/models")
async def list_models(request: Request):
    state = request.app.state.cake
    data = [] if state.model_id is None else [
        {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "cake"}]
    return {"object": "list", "data": data}
