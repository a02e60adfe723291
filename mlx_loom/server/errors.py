"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} for every failure.

Routes raise ApiError; FastAPI's own errors (validation, unknown route, wrong method) are
reworded into the same shape. Nothing a client sends should reach the 500 handler.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mlx_loom.server")

# Validation failures about a value (not its JSON type or presence) are 400s, like OpenAI's.
_VALUE_ERRORS = {
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
    "too_long", "too_short", "string_too_long", "string_too_short", "literal_error", "enum",
    "value_error", "finite_number",
}


class ApiError(Exception):
    """An error the client can fix (4xx) or a server state it must wait out (503)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def describe_validation(errors: Sequence[dict[str, Any]]) -> tuple[int, str, str | None]:
    """(status, message, param) for pydantic errors: 400 for bad values, 422 for bad shapes."""
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    if first.get("type") == "json_invalid":
        message = f"request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})"
    else:
        message = f"{where}{first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    status = 400 if all(e.get("type") in _VALUE_ERRORS for e in errors) else 422
    return status, message, param


def _is_union_tag(part: object) -> bool:
    """pydantic puts the tried union member in the location ("str", "list[int]"): not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    status, message, param = describe_validation(exc.errors())
    return error_response(status, message, param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    messages = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on {request.url.path}"}
    message = messages.get(exc.status_code, str(exc.detail))
    code = "request_too_large" if exc.status_code == 413 else None
    return JSONResponse(error_body(exc.status_code, message, code=code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not a client error: log the traceback, answer in the same shape.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
