"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} for every failure.

Routes raise ApiError; FastAPI's own errors (validation, unknown route, wrong method) are
reworded into the same shape. Nothing a client sends should reach the 500 handler.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("mlx_loom.server")

# pydantic's "<kind>_type" errors -> what the field must be, in JSON words.
_EXPECTED = {
    "string_type": "a string", "list_type": "an array", "int_type": "an integer", "float_type": "a number",
    "bool_type": "a boolean (true or false)", "dict_type": "an object", "model_type": "an object",
    "model_attributes_type": "an object", "none_required": "null",
}


class ApiError(Exception):
    """An error the client can fix (4xx) or a server state it must wait out (503)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error object. Its texts echo what the client sent (a field path holds the client's
    object keys), so lone surrogates are written out as their escapes: UTF-8 cannot encode them."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": escape_surrogates(message), "type": kind,
                      "param": None if param is None else escape_surrogates(param), "code": code}}


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_surrogates(text: str) -> str:
    """`text` with each lone UTF-16 surrogate (JSON's "\\ud800" decodes to one) written as the six
    characters \\ud800, so the text can be encoded; other text unchanged."""
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def describe_validation(errors: Sequence[dict[str, Any]]) -> tuple[int, str, str | None]:
    """(status, message, param) for pydantic errors: always 400, as OpenAI answers a body it cannot use.

    A union field (e.g. `content`: string or array of parts) fails once per member: the deepest
    error is the member the client meant (a list of parts missing a "type"); errors sharing its
    param are described together ("must be a string or an array").
    """
    if errors[0].get("type") == "json_invalid":  # its loc is a character position, not a field
        reason = errors[0].get("ctx", {}).get("error", "parse error")
        return 400, f"request body is not valid JSON ({reason}); send a JSON object", None
    param = _param(max(errors, key=lambda e: len((_param(e) or "").split("."))))
    message = _field_message(param, [e for e in errors if _param(e) == param])
    others = len({_param(e) for e in errors}) - 1
    if others:
        message += f" (and {others} more invalid field{'s' if others > 1 else ''})"
    return 400, message, param


def _param(error: dict[str, Any]) -> str | None:
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    return ".".join(loc) or None


def _field_message(param: str | None, errors: list[dict[str, Any]]) -> str:
    first = errors[0]
    if param is None:  # the body itself
        if first.get("type") == "missing":
            return "the request body is empty; send a JSON object"
        if isinstance(first.get("input"), (bytes, bytearray)):  # FastAPI parses JSON only when declared
            return "the request body is not read as JSON; send it with the header 'Content-Type: application/json'"
        return f"the request body must be a JSON object, got {_json_kind(first.get('input'))}"
    if first.get("type") == "missing":
        return f"'{param}' is required"
    expected = list(dict.fromkeys(_EXPECTED.get(e.get("type", ""), "") for e in errors))
    if all(expected):
        got = first.get("input")
        hint = "; send it without quotes" if isinstance(got, str) and "string" not in expected[0] else ""
        return f"{param} must be {' or '.join(expected)}, got {_json_kind(got)}{hint}"
    return f"{param}: {first.get('msg', 'invalid value')}"


def _json_kind(value: object) -> str:
    """How a parsed JSON value is named in messages (bool before int: True is an int in Python)."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _is_union_tag(part: object) -> bool:
    """pydantic puts the tried union member in the location ("str", "list[int]", "NamedToolChoice",
    "function-after[...]"): not a field. Request fields are snake_case, so a capital marks a class."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or "-" in part
                                      or part[:1].isupper())


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
