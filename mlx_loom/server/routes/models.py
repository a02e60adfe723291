"""GET /v1/models"""

from __future__ import annotations

from fastapi import APIRouter, Request

from mlx_loom.server.protocol import ModelCard, ModelList
from mlx_loom.server.state import get_state

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, summary="The one model this server serves")
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    info = state.require_ready()
    return ModelList(data=[ModelCard(id=state.served_name, created=state.created, max_model_len=info.max_model_len)])
