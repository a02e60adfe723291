"""The engine thread: owns the EngineCore, so every MLX array lives on this one thread.

Loop: drain the inbox (add / abort), step, hand the step's outputs to the event loop in one
call. A crash is loud: every open request gets an error output and the engine reports itself
dead. This module imports no mlx at import time (the core is built inside the thread).
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from typing import Callable

from mlx_loom.engine.info import EngineInfo
from mlx_loom.engine.messages import (
    AbortRequest,
    AddRequest,
    EngineStats,
    RequestOutput,
)
from mlx_loom.sched.config import EngineConfig

log = logging.getLogger("mlx_loom.engine")

Emit = Callable[[list[RequestOutput]], None]


class _Stop:
    """Inbox sentinel: finish the loop."""


class EngineThread(threading.Thread):
    def __init__(self, config: EngineConfig, emit: Emit, on_ready: Callable[[object], None]) -> None:
        super().__init__(name="mlx-loom-engine", daemon=True)
        self.config = config
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stats: EngineStats | None = None
        self.dead_reason: str | None = None
        self._emit = emit
        self._on_ready = on_ready
        self.core = None
        self.phase = "loading the model"

    # -- any thread --
    def submit(self, msg: AddRequest | AbortRequest) -> None:
        self.inbox.put(msg)

    def stop(self) -> None:
        self.inbox.put(_Stop())

    # -- engine thread --
    def run(self) -> None:
        try:
            from mlx_loom.engine.core import EngineCore

            self.core = EngineCore(self.config)
            if self.config.warmup:
                self.phase = "warming up"
                self.core.warm_up()
        except BaseException as exc:
            what = "warm up" if self.phase == "warming up" else "load"
            self.dead_reason = f"model failed to {what}: {exc}"
            log.exception("model failed to %s", what)
            self._on_ready(RuntimeError(self.dead_reason))
            return
        self.core.begin_serving(self._group_stalled)
        self.stats = self.core.stats()
        self.phase = "ready"
        self._on_ready(self.core.info)
        try:
            self._loop()
        except BaseException as exc:
            self.dead_reason = f"engine crashed: {exc!r}"
            log.error("engine crashed:\n%s", traceback.format_exc())
            self._emit(self.core.fail_all(self.dead_reason) + self._fail_inbox(self.dead_reason))

    def _loop(self) -> None:
        core = self.core
        while True:
            if self.dead_reason is not None:  # the group's watchdog failed every request meanwhile
                return
            if not self._drain(block=not core.has_unfinished()):
                self.dead_reason = "engine stopped"
                self._emit(core.fail_all("server is shutting down", "abort") + self._fail_inbox("server is shutting down"))
                core.close()
                return
            outputs = core.step()
            self.stats = core.stats()
            if outputs:
                self._emit(outputs)

    def _drain(self, block: bool) -> bool:
        """Apply queued messages; False once a stop was requested."""
        tick = self.core.idle_tick_s if block else None
        try:
            msg = self.inbox.get(block=block, timeout=tick)
        except queue.Empty:
            if tick is not None:
                self.core.idle()
            return True
        outputs = []
        while True:
            if isinstance(msg, _Stop):
                return False
            out = self._apply(msg)
            if out is not None:
                outputs.append(out)
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
        self.stats = self.core.stats()
        if outputs:
            self._emit(outputs)
        return True

    def _apply(self, msg: AddRequest | AbortRequest) -> RequestOutput | None:
        """Add or abort; an unexpected exception fails that one request, not the engine."""
        try:
            return self.core.abort(msg.request_id) if isinstance(msg, AbortRequest) else self.core.add(msg)
        except Exception as exc:
            log.exception("%s of %s failed", type(msg).__name__, msg.request_id)
            if isinstance(msg, AbortRequest):
                return None
            return RequestOutput(msg.request_id, (), finish_reason="error", blame="engine",
                                 error=f"the engine failed to queue this request ({type(exc).__name__}: {exc})")

    def _group_stalled(self, reason: str) -> None:
        """From the group's watchdog thread while this thread is stuck in a collective: /health turns
        503 with the reason and every open request ends with an error now (the core is not touched
        beyond reading which requests it holds)."""
        self.dead_reason = reason
        log.error("%s", reason)
        open_ids = list(self.core.scheduler.requests)
        self._emit([RequestOutput(rid, (), finish_reason="error", error=reason) for rid in open_ids]
                   + self._fail_inbox(reason))

    def _fail_inbox(self, message: str) -> list[RequestOutput]:
        """Requests still queued never reached the scheduler: fail them too."""
        outputs = []
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                return outputs
            if isinstance(msg, AddRequest):
                outputs.append(RequestOutput(msg.request_id, (), finish_reason="error", error=message))
