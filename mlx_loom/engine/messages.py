"""The only types that cross between the event loop and the engine thread.

Frozen dataclasses of plain Python values: no mlx arrays, no mutable engine state.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_loom.sched.params import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """Most likely alternatives (token id, logprob), best first, when top_logprobs > 0."""


@dataclass(frozen=True)
class RequestOutput:
    """New tokens for one request from one engine step (a delta, not the whole text)."""

    request_id: str
    new_token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: str | None = None
    """None while running; "stop", "length", "abort" or "error" once finished."""
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    error: str | None = None
    """Set with finish_reason "error": what went wrong and what to change."""
    blame: str | None = None
    """With an error: "request" (it cannot run as sent), "engine" (a step failed while running it;
    the engine serves on), None (the engine is gone)."""
    spec_proposed: int = 0
    """Speculative decoding, cumulative for the request: draft tokens the target verified."""
    spec_accepted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_free: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    """In tokens: prompt tokens looked up / found in the prefix cache."""
    steps: int
    sparse_prefill_chunks: int = 0
    """Prefill chunks whose attention ran sparse (MInference patterns), and their tokens."""
    sparse_prefill_tokens: int = 0
    spec_enabled: bool = False
    spec_num_drafts: int = 0
    """Speculative rows verified by the target."""
    spec_proposed: tuple[int, ...] = ()
    """Draft tokens proposed per level (level 1: verified by the target; level 2: by the draft)."""
    spec_accepted: tuple[int, ...] = ()
    group: dict | None = None
    """Over several ranks: world_size, mode, each rank's share (heads or layers), the step channel's
    frames / bytes / seconds (mlx_loom/dist/). None in one process."""
