"""Asyncio facade in front of the engine thread (loop side; never imports mlx).

One hop in per request (submit), one hop out per engine step (a single call_soon_threadsafe
carrying every request's delta), and abort as the only back-hop.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import AsyncIterator, Sequence

from mlx_loom.engine.info import EngineInfo
from mlx_loom.engine.messages import (
    AbortRequest,
    AddRequest,
    EngineStats,
    RequestOutput,
)
from mlx_loom.engine.thread import EngineThread
from mlx_loom.sched.config import EngineConfig
from mlx_loom.sched.params import SamplingParams

__all__ = ["EngineClient", "EngineInfo", "RequestRejected", "RequestFailed", "EngineDeadError"]


class RequestRejected(ValueError):
    """The engine refused the request at admission (the message says what to change)."""


class RequestFailed(RuntimeError):
    """A step running this request failed inside the engine (a bug); the engine serves on."""


class EngineDeadError(RuntimeError):
    """The engine is not running (failed to load, crashed, or shut down)."""


class EngineClient:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.info: EngineInfo | None = None
        self._thread: EngineThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()

    @property
    def ready(self) -> bool:
        return self.info is not None and self.dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        if self._thread is None:
            return "engine not started"
        if self._thread.dead_reason:
            return self._thread.dead_reason
        if self.info is not None and not self._thread.is_alive():
            return "engine stopped"
        return None

    @property
    def phase(self) -> str:
        """What the engine is doing before it is ready: "loading the model", "warming up", "ready"."""
        return self._thread.phase if self._thread is not None else "not started"

    async def start(self) -> EngineInfo:
        """Start the engine thread and wait until the model has loaded (raises if it fails)."""
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future = self._loop.create_future()

        def on_ready(result: EngineInfo | BaseException) -> None:
            self._loop.call_soon_threadsafe(_settle, started, result)

        self._thread = EngineThread(self.config, self._emit_threadsafe, on_ready)
        self._thread.start()
        self.info = await started
        return self.info

    async def generate(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream deltas for one request; leaving the loop early aborts it in the engine."""
        if not self.ready:
            raise EngineDeadError(self.dead_reason or "engine not ready")
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        self._thread.submit(AddRequest(rid, tuple(prompt_token_ids), params))
        finished = False
        try:
            while not finished:
                out: RequestOutput = await q.get()
                finished = out.finished
                if out.finish_reason == "error":
                    raise _error(out)
                yield out
        finally:
            self._queues.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        if self._thread is not None:
            self._thread.submit(AbortRequest(request_id))

    async def stats(self) -> EngineStats | None:
        return self._thread.stats if self._thread is not None else None

    async def shutdown(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self._thread.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    def _emit_threadsafe(self, outputs: list[RequestOutput]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)


def _error(out: RequestOutput) -> Exception:
    """The exception for an error output: by whom it was caused."""
    if out.blame == "engine":
        return RequestFailed(out.error or "engine step failed")
    if out.blame == "request":
        return RequestRejected(out.error or "request rejected")
    return EngineDeadError(out.error or "engine failed")


def _settle(fut: asyncio.Future, result: EngineInfo | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(EngineDeadError(str(result)))  # the engine thread's reason
    else:
        fut.set_result(result)
