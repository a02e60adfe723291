"""GET /v1/models and GET /v1/models/{model_id}"""

from __future__ import annotations

from fastapi import APIRouter, Request

from mlx_loom.server.openapi import READ_ERRORS, error_responses
from mlx_loom.server.protocol import ModelCard, ModelList
from mlx_loom.server.state import ServerState, get_state

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, summary="The one model this server serves",
            responses=error_responses(*READ_ERRORS))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(get_state(request))])


# `:path` because hub ids contain a slash ("org/name"), as does a --model path.
@router.get("/v1/models/{model_id:path}", response_model=ModelCard,
            summary="One model by id (404 model_not_found for any id this server does not serve)",
            responses=error_responses(404, *READ_ERRORS))
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.require_ready()  # before the name check: the served name is only known once loaded
    state.check_model(model_id)
    return _card(state)


def _card(state: ServerState) -> ModelCard:
    info = state.require_ready()
    return ModelCard(id=state.served_name, created=state.created, max_model_len=info.max_model_len)
