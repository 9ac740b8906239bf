"""The FastAPI application: routes per modality over one shared server state."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cake.server import (auth, chat, completions, embeddings, errors, health, images, metrics,
                         models, schemas, speech, topology, ui)


@dataclass
class ServerState:
    """What is loaded. Exactly one of text / image / audio is set once loading is done."""

    model_id: Optional[str] = None
    text: Any = None
    image: Any = None
    audio: Any = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState, access: Optional[auth.Access] = None) -> FastAPI:
    app = FastAPI(title="cake", redoc_url=None)
    app.state.cake = state
    errors.install(app)
    for module in (chat, completions, embeddings, models, images, speech, health, metrics,
                   topology):
        app.include_router(module.router)

    def openapi() -> dict:
        # Routes read their bodies themselves (to answer 400 rather than 422): their
        # pydantic models are added to the document here.
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(
                schemas.openapi_components())
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    ui.install(app)
    auth.install(app, access)
    return app
