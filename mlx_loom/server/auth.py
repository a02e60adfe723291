"""Optional API key: every /v1 route requires `Authorization: Bearer <key>` (401 otherwise).

A pure ASGI middleware, so a request without the key is refused before its body is read.
/health, /metrics, /docs and /openapi.json stay public for probes, scrapers and people.
"""

from __future__ import annotations

import hmac
from collections import Counter

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from mlx_loom.server.errors import error_body


def is_protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def key_problem(authorization: str | None, api_key: str) -> str | None:
    """Why the Authorization header does not carry the key (None: it does)."""
    if not authorization:
        return "missing API key: send the header 'Authorization: Bearer <key>' with the server's --api-key"
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return "malformed Authorization header: expected 'Authorization: Bearer <key>'"
    # Constant-time, so response timing does not reveal how much of a guess was right.
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return "invalid API key in the Authorization header; use the key the server was started with"
    return None


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str, rejected: Counter[str]) -> None:
        self.app = app
        self.api_key = api_key
        self.rejected = rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_protected(scope["path"]):
            problem = key_problem(Headers(scope=scope).get("authorization"), self.api_key)
            if problem is not None:
                self.rejected["unauthorized"] += 1
                body = error_body(401, problem, code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)
