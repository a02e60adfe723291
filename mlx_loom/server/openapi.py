"""What the OpenAPI document says about errors: every route lists the statuses it really answers
with, each with the one error body (ErrorResponse), instead of FastAPI's default 422 schema
(validation failures are 400s here, see errors.describe_validation)."""

from __future__ import annotations

from typing import Any

from mlx_loom.server.protocol import ErrorResponse

_WHY = {
    400: "Invalid request: malformed JSON, a missing or wrongly typed field, a value out of range, "
         "a prompt longer than the context",
    401: "Missing or wrong API key (only when the server runs with --api-key)",
    404: "Unknown model (code model_not_found) or route",
    413: "Request body larger than the server's limit (code request_too_large)",
    429: "Too many requests queued (Retry-After says when to retry)",
    500: "Internal or engine step failure",
    503: "Model still loading, engine not running, or server shutting down",
    "default": "Any other error, in the same shape",
}

# Statuses of the routes that take a request body (chat, completions).
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 503)
# Statuses of GET /v1/... routes.
READ_ERRORS = (401, 500, 503)


# The 200 of chat / completions with "stream": true.
STREAM_OK = {200: {"description": "The completion; with \"stream\": true, server-sent events (data: <chunk JSON>, "
                                  "then data: [DONE])",
                   "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with the error schema; "default" as well, which also
    keeps FastAPI from documenting a 422 this server never sends."""
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in (*statuses, "default")}
