"""The FastAPI application: routes per modality over one shared server state."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI

from cake.server import auth, chat, errors, health, images, models, speech, topology, ui


@dataclass
class ServerState:
    """What is loaded. Exactly one of text / image / audio is set once loading is done."""

    model_id: Optional[str] = None
    text: Any = None
    image: Any = None
    audio: Any = None
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(state: ServerState, access: Optional[auth.Access] = None) -> FastAPI:
    app = FastAPI(title="cake", docs_url=None, redoc_url=None)
    app.state.cake = state
    errors.install(app)
    for module in (chat, models, images, speech, health, topology):
        app.include_router(module.router)
    ui.install(app)
    auth.install(app, access)
    return app
