"""GET /api/v1/topology: the cluster as JSON (on one machine, the master alone)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from cake.cluster.topology import cake_shape, text_topology

router = APIRouter()


@router.get("/api/v1/topology")
async def topology(request: Request):
    return cake_shape(document(request.app.state.cake))


def document(state) -> dict:
    if state.text is not None:
        engine = state.text.engine
        pipeline = engine.pipeline
        if hasattr(pipeline, "topology"):  # a cluster: workers and their status too
            doc = pipeline.topology(state.model_id)
        else:
            doc = text_topology(state.model_id, pipeline.stages)
        if engine.drafter is not None:  # it runs beside the master's layers
            doc.setdefault("master", {})["draft_model"] = engine.drafter.describe()
        return doc
    loaded = state.image or state.audio
    doc = loaded.topology() if hasattr(loaded, "topology") else None
    if doc is not None:
        return doc
    return {"model": state.model_id, "model_id": state.model_id, "master": {}, "workers": [],
            "layer_details": {}}
