"""Who gets in: while the model loads and once the server drains, every request but /health
is answered 503; requests in flight are counted so that a drain knows when it is done."""
from __future__ import annotations

from cake.server.errors import error_response
from cake.server.events import DRAINING

LOADING = "the model is still loading; try again shortly (GET /health shows the progress)"


class Gate:
    """Pure ASGI (not BaseHTTPMiddleware): a streamed answer counts until its last byte."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = self.state
        refusal = None
        if state.draining:
            refusal = error_response(503, DRAINING, headers={"Connection": "close"})
        elif state.loading is not None and scope["path"] != "/health":
            refusal = error_response(503, LOADING, headers={"Retry-After": "5"})
        if refusal is not None:
            return await refusal(scope, receive, send)
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
