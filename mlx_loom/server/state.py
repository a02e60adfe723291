"""What the routes share: settings, the engine client, the engine's start-up state, admission."""

from __future__ import annotations

import collections
import logging
import time

from fastapi import Request

from mlx_loom.server.admission import Admission, shutting_down
from mlx_loom.server.errors import ApiError
from mlx_loom.server.settings import Settings

log = logging.getLogger("mlx_loom.server")


class ServerState:
    def __init__(self, settings: Settings, client) -> None:
        self.settings = settings
        self.client = client
        self.created = int(time.time())
        self.load_error: str | None = None
        self.rejected: collections.Counter[str] = collections.Counter()
        """Requests refused, by reason ("queue_full", "unauthorized", "shutting_down"); read by /metrics."""
        self.admission = Admission(settings.max_num_seqs, settings.max_queued_requests, self.rejected)

    async def start_engine(self) -> None:
        """Load the model (in the engine thread); a failure leaves /health at 503 with the reason."""
        t0 = time.perf_counter()
        try:
            info = await self.client.start()
        except Exception as exc:
            self.load_error = str(exc) or type(exc).__name__
            log.error("engine failed to start: %s", self.load_error)
            return
        log.info("engine ready in %.1fs: model %s, context %d tokens", time.perf_counter() - t0,
                 info.model_name, info.max_model_len)

    def begin_shutdown(self) -> None:
        """New requests get 503; in-flight ones get `shutdown_timeout` seconds (on the event loop)."""
        if not self.admission.draining:
            log.info("shutting down: %d requests in flight get %gs to finish", self.admission.in_flight,
                     self.settings.shutdown_timeout)
        self.admission.begin_drain(self.settings.shutdown_timeout)

    def not_ready_reason(self) -> str | None:
        if self.admission.draining:
            return "the server is shutting down"
        if self.client.ready:
            return None
        if self.load_error is not None:
            return f"engine is not running: {self.load_error}"
        if self.client.info is None:
            if self.client.phase == "warming up":
                return "the engine is warming up (running each step shape once); retry shortly"
            return "the model is still loading; retry shortly"
        return f"engine is not running: {self.client.dead_reason or 'unknown reason'}"

    def require_ready(self):
        """The EngineInfo, or a 503 saying why there is none."""
        if self.admission.draining:
            self.rejected["shutting_down"] += 1
            raise shutting_down("new requests are refused")
        reason = self.not_ready_reason()
        if reason is not None:
            raise ApiError(503, reason, code="engine_not_ready")
        return self.client.info

    @property
    def served_name(self) -> str:
        info = self.client.info
        return self.settings.served_model_name or (info.model_name if info is not None else "unknown")

    def check_model(self, name: str | None) -> str:
        """The name to report; an unknown model name is a 404 model_not_found, as OpenAI answers
        (one model per server: its served name, or the --model path it was started with)."""
        if name is not None and not self.serves(name):
            raise ApiError(404, f"model {name!r} does not exist on this server; it serves {self.served_name!r} "
                                "(see GET /v1/models)", "model", "model_not_found")
        return self.served_name

    def serves(self, name: str) -> bool:
        return name == self.served_name or (self.settings.model is not None and name == self.settings.model)


def get_state(request: Request) -> ServerState:
    return request.app.state.loom
