"""GET /metrics: Prometheus exposition (public like /health; answers while the model loads)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from mlx_loom.server.metrics import metrics_of
from mlx_loom.server.state import get_state

router = APIRouter()


# response_class: the OpenAPI document says text/plain (Prometheus' text format), not JSON.
@router.get("/metrics", summary="Prometheus metrics (vLLM's names with the prefix mlx_loom:)",
            response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    state = get_state(request)
    stats = await state.client.stats()  # None until the model has loaded: engine series are left out
    rejected = getattr(state, "rejected", {})  # reason -> count, kept by admission control
    body, content_type = metrics_of(request).render(stats, rejected)
    return Response(body, media_type=content_type)
