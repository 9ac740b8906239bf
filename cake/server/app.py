"""The FastAPI application: routes per modality over one shared server state."""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cake.server import (auth, chat, completions, embeddings, errors, gate, health, images,
                         metrics, models, schemas, speech, topology, ui)


@dataclass
class ServerState:
    """What is loaded. Exactly one of text / image / audio is set once loading is done;
    meanwhile loading says what is going on (None once ready). draining: a stop was asked
    for; in_flight: requests not yet answered to their last byte."""

    model_id: Optional[str] = None
    text: Any = None
    image: Any = None
    audio: Any = None
    created: int = field(default_factory=lambda: int(time.time()))
    loading: Optional[dict] = None
    started: float = field(default_factory=time.monotonic)
    draining: bool = False
    in_flight: int = 0
    event_queues: weakref.WeakSet = field(default_factory=weakref.WeakSet)

    def ready(self, model_id: str, attr: str, model: Any) -> None:
        self.model_id = model_id
        setattr(self, attr, model)
        self.loading = None

    def end_streams(self) -> None:
        """From any thread: every request still waiting for events ends (a final error
        chunk for a stream, 503 for a blocking request)."""
        for _ in range(3):  # a request in another thread may add its queue meanwhile
            try:
                queues = list(self.event_queues)
                break
            except RuntimeError:
                continue
        for queue in queues:
            queue.end()

    def load_progress(self) -> dict:
        """The phase, seconds so far, and where the loader can tell, bytes read of the
        weights and their fraction."""
        from cake import loading

        return {**(self.loading or {}), **loading.progress(),
                "seconds": round(time.monotonic() - self.started, 1)}


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
    app.add_middleware(gate.Gate, state=state)
    auth.install(app, access)  # added last, runs first
    return app
