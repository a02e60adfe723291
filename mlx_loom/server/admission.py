"""Admission control: a cap on engine requests in flight, and the bounded drain at shutdown.

Counted at the HTTP layer in engine requests (a request with n=4 over 2 prompts holds 8),
taken just before submission and given back when the HTTP response is over (finished, failed
or abandoned by the client). Up to max_num_seqs run and max_queued_requests wait in the engine;
one more is a 429 with Retry-After, so a burst costs a bounded queue, never unbounded memory.
At shutdown, in-flight requests get `shutdown_timeout` seconds, then end with a 503.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import aclosing
from typing import Annotated, AsyncIterator, TypeVar

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from mlx_loom.server.errors import ApiError, bad_request, error_response

T = TypeVar("T")

# The queue of a busy server turns over within seconds; clients add their own backoff on top.
RETRY_AFTER_S = 1


class Overloaded(ApiError):
    """429: every admission slot is taken; the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(429, message, code="too_many_requests")
        self.retry_after = retry_after


def shutting_down(detail: str) -> ApiError:
    return ApiError(503, f"the server is shutting down: {detail}; retry on another instance or after restart",
                    code="server_shutting_down")


class Admission:
    """In-flight engine requests against `capacity`; the drain deadline once shutdown begins."""

    def __init__(self, running: int, queued: int, rejected: Counter[str]) -> None:
        self.running, self.queued = running, queued
        self.capacity = running + queued
        self.in_flight = 0
        self.rejected = rejected
        self.deadline: float | None = None
        """Event-loop time at which in-flight requests are stopped; None until shutdown begins."""
        self.grace_s = 0.0
        self._waiting: set[asyncio.Task] = set()  # tasks awaiting their next event in guard()
        self._stopped: set[asyncio.Task] = set()  # of those, the ones the deadline cancelled

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def acquire(self, count: int) -> None:
        """Take `count` slots, or raise: 400 if the request can never fit, 429 if it does not fit now."""
        if count > self.capacity:
            raise bad_request(f"this request makes {count} engine requests (prompts x n) but the server admits "
                              f"at most {self.capacity} at once (--max-num-seqs {self.running} + "
                              f"--max-queued-requests {self.queued}); lower n or send fewer prompts", "n")
        if self.in_flight + count > self.capacity:
            self.rejected["queue_full"] += 1
            raise Overloaded(f"the server is at capacity ({self.in_flight} of {self.capacity} requests in flight: "
                             f"{self.running} running + {self.queued} queued); retry after {RETRY_AFTER_S} s")
        self.in_flight += count

    def release(self, count: int) -> None:
        self.in_flight -= count
        assert self.in_flight >= 0, "admission slots released twice"

    def begin_drain(self, grace_s: float) -> None:
        """Stop every in-flight request `grace_s` seconds from now (call on the event loop; once)."""
        if self.draining:
            return
        loop = asyncio.get_running_loop()
        self.grace_s = grace_s
        self.deadline = loop.time() + grace_s
        loop.call_at(self.deadline, self._stop_waiting)

    async def guard(self, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """`events`, ended with a 503 ApiError once the drain deadline passes."""
        async with aclosing(events):
            while True:
                try:
                    event = await self._next(events)
                except StopAsyncIteration:
                    return
                yield event

    async def _next(self, events: AsyncIterator[T]) -> T:
        # Only a task parked here is cancelled at the deadline, so the cancellation always lands on
        # this await (never in the route's own code); a task elsewhere meets the check on its way in.
        if self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline:
            raise self._stopped_error()
        task = asyncio.current_task()
        self._waiting.add(task)
        try:
            return await anext(events)
        except asyncio.CancelledError:
            if task not in self._stopped or _uncancel(task) > 0:
                raise  # cancelled by someone else (client gone): stays a cancellation
            raise self._stopped_error() from None
        finally:
            self._waiting.discard(task)
            self._stopped.discard(task)

    def _stop_waiting(self) -> None:
        for task in self._waiting:
            self._stopped.add(task)
            task.cancel()

    def _stopped_error(self) -> ApiError:
        return shutting_down(f"request stopped after the {self.grace_s:g} s grace period")


def _uncancel(task: asyncio.Task) -> int:
    """Task.uncancel() where it exists (3.11+): the cancellations still pending besides ours."""
    return task.uncancel() if hasattr(task, "uncancel") else 0


class Slot:
    """One HTTP request's share of the admission count; given back exactly once."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.held = 0

    def admit(self, count: int, events: AsyncIterator[T]) -> AsyncIterator[T]:
        """Take `count` slots (or raise 400/429) and return `events` under the shutdown deadline.

        `events` must not have started: nothing reaches the engine unless this returns.
        """
        assert self.held == 0, "one admission per request"
        self.admission.acquire(count)
        self.held = count
        return self.admission.guard(events)

    def release(self) -> None:
        if self.held:
            self.admission.release(self.held)
            self.held = 0


async def admission_slot(request: Request) -> AsyncIterator[Slot]:
    """FastAPI dependency: its exit runs after the response is sent, or when the request fails or
    the client leaves, so the slot always comes back (ServerState lives at app.state.loom)."""
    slot = Slot(request.app.state.loom.admission)
    try:
        yield slot
    finally:
        slot.release()


AdmissionSlot = Annotated[Slot, Depends(admission_slot)]


async def overloaded_response(request: Request, exc: Overloaded) -> JSONResponse:
    response = error_response(exc.status, exc.message, exc.param, exc.code)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response
