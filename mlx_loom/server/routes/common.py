"""Pieces shared by the chat and completions routes."""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Iterator, Sequence

from mlx_loom.engine.client import EngineDeadError, RequestFailed, RequestRejected
from mlx_loom.schemas.grammar import CompiledGrammar
from mlx_loom.server.errors import ApiError, bad_request
from mlx_loom.server.logprobs import TokenText
from mlx_loom.server.output import ChoiceEvent, ChoiceSpec, Collector
from mlx_loom.server.protocol import unsupported_fields
from mlx_loom.server.sampling import make_params
from mlx_loom.server.sse import error_event
from mlx_loom.server.structured import validation_error
from mlx_loom.server.tools import ToolPlan

log = logging.getLogger("mlx_loom.server")

MAX_CHOICES = 256


@dataclass(frozen=True)
class Job:
    """One HTTP generation request once validated: what to run and how to report it."""

    id: str
    created: int
    model: str
    specs: tuple[ChoiceSpec, ...]
    choices_per_prompt: int
    stops: tuple[str, ...]
    text_of: TokenText
    include_usage: bool
    grammar: CompiledGrammar | None = None
    """The response_format grammar of every choice, for final validation."""
    tools: ToolPlan | None = None
    """Chat with tools: how each choice's text becomes content and tool calls."""

    def validation(self, text: str, finish_reason: str | None) -> dict:
        """{"validation_error": why} when a finished constrained choice does not validate, else {}."""
        problem = validation_error(self.grammar, text, finish_reason)
        return {"validation_error": problem} if problem else {}

    def collector(self) -> Collector:
        return Collector(self.specs, self.choices_per_prompt)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def reject_unsupported(req) -> None:
    found = unsupported_fields(req)
    if found:
        names = ", ".join(f"'{name}' {why}" for name, why in found)
        raise bad_request(f"unsupported request field(s): {names}; remove them", found[0][0], "unsupported_field")


def plan_choices(job_id: str, prompts: Sequence[Sequence[int]], kwargs: dict, seed: int | None,
                 n: int) -> tuple[ChoiceSpec, ...]:
    """Choice p*n + i is the i-th sample of prompt p; each choice is one engine request."""
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"{len(prompts)} prompts x n={n} makes more than {MAX_CHOICES} choices", "n")
    specs = []
    for p, prompt in enumerate(prompts):
        for i in range(n):
            index = p * n + i
            specs.append(ChoiceSpec(index, tuple(prompt), make_params(kwargs, seed, i), f"{job_id}-{index}"))
    return tuple(specs)


def make_job(job_id: str, model: str, specs: tuple[ChoiceSpec, ...], n: int, stops: tuple[str, ...],
             tokenizer, stream_options, grammar: CompiledGrammar | None = None,
             tools: ToolPlan | None = None) -> Job:
    include_usage = bool(stream_options and stream_options.include_usage)
    return Job(job_id, int(time.time()), model, specs, n, stops, TokenText(tokenizer), include_usage, grammar,
               tools)


def as_api_error(exc: Exception) -> ApiError | None:
    """The HTTP meaning of an engine-side failure (None: not one of ours)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), code="request_rejected")
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, RequestFailed):  # logged by the engine; the server keeps serving
        return ApiError(500, str(exc), code="engine_step_failed")
    return None


def stream_error(exc: Exception) -> bytes:
    """The error event for a failure after the stream started (the status is already 200)."""
    api_error = as_api_error(exc)
    if api_error is None:
        log.exception("unexpected error while streaming")
        api_error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
    return error_event(api_error)


@contextmanager
def engine_errors() -> Iterator[None]:
    """Map engine failures to 400/503 for the non-streaming routes."""
    try:
        yield
    except (RequestRejected, RequestFailed, EngineDeadError) as exc:
        raise as_api_error(exc) from None


async def collect(events: AsyncIterator[ChoiceEvent], collector: Collector) -> Collector:
    async with aclosing(events):
        async for ev in events:
            collector.add(ev)
    return collector
