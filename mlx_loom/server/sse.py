"""Server-sent events in OpenAI's framing, and client-disconnect handling for both kinds of route."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mlx_loom.server.errors import ApiError, error_body

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def event(payload: Any) -> bytes:
    """One `data:` event; payload is a pydantic model or a JSON-able dict."""
    text = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return b"data: " + text.encode() + b"\n\n"


def error_event(exc: ApiError) -> bytes:
    """A failure after the 200 was sent: an error event (OpenAI's SDK raises it), then [DONE]."""
    return event(error_body(exc.status, exc.message, exc.param, exc.code))


class EventStream(StreamingResponse):
    """SSE response that always closes its generator, so a vanished client aborts its request.

    Starlette stops iterating when the client disconnects but leaves the generator suspended;
    closing it here runs its cleanup (engine abort) now instead of whenever it is collected.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work` unless the client disconnects first; then cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    return None if task.cancelled() else task.result()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next message the server sends us is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
