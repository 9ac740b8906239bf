"""Every error leaves the server as {"error": "..."} with the status the spec gives."""
from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cake.server.disconnect import ClientGone

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def busy(error: Exception) -> APIError:
    """The engine's queue is full: 429, and when to try again."""
    return APIError(429, f"server busy: {error}; retry later", {"Retry-After": "1"})


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def internal_error(what: str, where: str, detail: str = "") -> APIError:
    """A 500 the client can quote: `what` failed (our words, no exception text, stack or
    path), with an id that the log line carrying the detail shares."""
    request_id = uuid.uuid4().hex[:12]
    log.error("internal error %s on %s: %s", request_id, where, detail or what)
    return APIError(500, f"{what} (request {request_id}; the server log has the details)")


def describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            return "malformed JSON in request body"
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "invalid request: " + "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.headers)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return error_response(499, "client disconnected")  # nginx's code; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(400, describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # The client gets an id to quote; the log has the stack under the same id.
        request_id = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s", request_id, request.url.path)
        return error_response(500, f"internal error (request {request_id}; the server log "
                                   "has the details)")
