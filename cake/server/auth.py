"""Access control: HTTP Basic for the web UI (--ui-auth user:pass) and a Bearer API key
(--api-key / CAKE_API_KEY) for the API. /health is always open.

Each path is guarded by the checks that cover it and any one of them admits a request:
  /, /static/*          Basic (the page itself)
  /api/v1/topology,
  /api/v1/info          Basic and Bearer (the UI reads them; so may API clients)
  other /v1/*, /api/*,
  /tokenize, /detokenize Bearer
  /metrics, /docs, /openapi.json  open (nothing private; scrapers carry no credentials)
This is a plain ASGI middleware, so streamed responses and disconnect detection pass through
untouched. Secrets are compared with hmac.compare_digest (constant time).
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass
from typing import Optional

UI_PATHS = ("/", "/static/")
UI_API_PATHS = ("/api/v1/topology", "/api/v1/info")
API_PREFIXES = ("/v1/", "/api/", "/tokenize", "/detokenize")
REALM = "cake"


@dataclass
class Access:
    ui_auth: Optional[str] = None  # "user:pass"
    api_key: Optional[str] = None

    def __post_init__(self):
        if self.ui_auth is not None and ":" not in self.ui_auth:
            raise ValueError("--ui-auth must be USER:PASSWORD")

    @property
    def enabled(self) -> bool:
        return bool(self.ui_auth or self.api_key)


def same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def basic_credentials(header: str) -> Optional[str]:
    """'Basic base64(user:pass)' → 'user:pass'; None for anything else."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def bearer_token(header: str) -> Optional[str]:
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def guards(access: Access, path: str) -> list[str]:
    """The checks that cover a path: a subset of ["basic", "bearer"]."""
    if path == "/health":
        return []
    out = []
    ui_api = path in UI_API_PATHS
    if access.ui_auth and (path == "/" or path.startswith(UI_PATHS[1]) or ui_api):
        out.append("basic")
    if access.api_key and (path.startswith(API_PREFIXES) or ui_api):
        out.append("bearer")
    return out


def admits(access: Access, checks: list[str], header: str) -> bool:
    if "basic" in checks:
        creds = basic_credentials(header)
        if creds is not None and same(creds, access.ui_auth):
            return True
    if "bearer" in checks:
        token = bearer_token(header)
        if token is not None and same(token, access.api_key):
            return True
    return False


def refusal(checks: list[str], header: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """401 body and headers. A Basic challenge makes browsers ask for the password, so it
    is left out when the request brought an API key (the page's own fetch with a bad key)."""
    sent_key = bearer_token(header) is not None
    if sent_key and "bearer" in checks:
        message = "invalid API key"
    elif basic_credentials(header) is not None and "basic" in checks:
        message = "invalid user name or password"
    elif checks == ["bearer"]:
        message = "missing API key: send 'Authorization: Bearer <key>'"
    else:
        message = "authentication required"
    challenges = []
    if "basic" in checks and not sent_key:
        challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')
    if "bearer" in checks:
        challenges.append(f'Bearer realm="{REALM}"')
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()),
               (b"www-authenticate", ", ".join(challenges).encode())]
    return body, headers


class AuthMiddleware:
    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        checks = guards(self.access, scope["path"])
        if not checks:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope["headers"]
                       if k == b"authorization"), "")
        if admits(self.access, checks, header):
            return await self.app(scope, receive, send)
        body, headers = refusal(checks, header)
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install(app, access: Optional[Access]) -> None:
    if access is not None and access.enabled:
        app.add_middleware(AuthMiddleware, access=access)
