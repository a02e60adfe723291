"""uvicorn, with the app told when shutdown begins (SIGTERM/SIGINT or should_exit).

uvicorn's own shutdown stops accepting connections, waits for open ones, and only then runs
the lifespan shutdown, so the app would never learn that it is draining; and its timeout
cancels handlers mid-stream. Here the app hears first: new requests get 503, in-flight ones
get --shutdown-timeout seconds and then end cleanly (503 / error event + [DONE]); uvicorn's
timeout stays as a backstop for clients that stop reading, then the engine stops.
"""

from __future__ import annotations

import socket

import uvicorn

from mlx_loom.server.state import ServerState

BACKSTOP_S = 5.0  # time for stopped requests to write their last bytes before uvicorn cancels them


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.state.begin_shutdown()
        await super().shutdown(sockets=sockets)


def make_server(app, host: str, port: int, log_level: str = "info") -> GracefulServer:
    """A server for `app` (from create_app) using its settings' backlog and shutdown timeout."""
    state: ServerState = app.state.loom
    settings = state.settings
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, backlog=settings.backlog,
                            timeout_graceful_shutdown=settings.shutdown_timeout + BACKSTOP_S)
    return GracefulServer(config, state)
