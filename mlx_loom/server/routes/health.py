"""GET /health (200 once the model is loaded, 503 while loading or after the engine died)
and GET /v1/engine/stats (the engine's counters, for debugging and tests)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mlx_loom.server.errors import error_response
from mlx_loom.server.openapi import READ_ERRORS, error_responses
from mlx_loom.server.state import get_state

router = APIRouter()


@router.get("/health", summary="200 when ready to serve; 503 (with the reason) while loading or if the engine died",
            responses=error_responses(503))
async def health(request: Request) -> JSONResponse:
    reason = get_state(request).not_ready_reason()
    if reason is not None:
        return error_response(503, reason, code="engine_not_ready")
    return JSONResponse({"status": "ok"})


@router.get("/v1/engine/stats", summary="Engine counters: running/waiting requests, free KV blocks, prefix cache; "
                                         "the backend the engine runs on", responses=error_responses(*READ_ERRORS))
async def engine_stats(request: Request) -> dict:
    state = get_state(request)
    info = state.require_ready()
    stats = await state.client.stats()
    return {"ready": True, "backend": info.backend, "warmup_seconds": info.warmup_seconds,
            **(asdict(stats) if stats is not None else {})}
