"""FastAPI application factory; the lifespan starts the engine and stops it on shutdown.

The model loads in the engine thread while the server already answers: /health is 503
until it is ready, so a load never blocks the event loop and a failure is visible.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlx_loom.server import errors
from mlx_loom.server.admission import Overloaded, overloaded_response
from mlx_loom.server.auth import ApiKeyAuth
from mlx_loom.server.limits import BodySizeLimit
from mlx_loom.server.metrics import ServerMetrics
from mlx_loom.server.routes import chat, completions, health, metrics, models
from mlx_loom.server.settings import Settings
from mlx_loom.server.state import ServerState

log = logging.getLogger("mlx_loom.server")


def create_app(settings: Settings | None = None, client=None) -> FastAPI:
    """The ASGI app; `client` defaults to a real EngineClient built from `settings`."""
    settings = settings or Settings()
    if client is None:
        from mlx_loom.engine.client import EngineClient

        client = EngineClient(settings.engine_config())
    app = FastAPI(title="mlx-loom", version="0.1.0", lifespan=_lifespan,
                  description="OpenAI-compatible LLM inference on MLX")
    app.state.loom = ServerState(settings, client)
    app.state.metrics = ServerMetrics()  # per app: never the global default registry
    errors.install(app)
    app.add_exception_handler(Overloaded, overloaded_response)  # a 429 carries Retry-After
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key:  # added last = outermost: a request without the key is refused first
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key, rejected=app.state.loom.rejected)
    for module in (chat, completions, models, health, metrics):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.loom
    loading = asyncio.create_task(state.start_engine())
    try:
        yield
    finally:
        if not loading.done():
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
        await state.client.shutdown()
        log.info("engine stopped")
