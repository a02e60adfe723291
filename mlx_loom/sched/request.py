"""One generation request as the scheduler sees it (pure Python, engine thread only)."""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field

from mlx_loom.sched.params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASONS


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """Tokens so far and progress; the KV blocks live in the KVCacheManager (keyed by id)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens (prompt + output) whose KV is in the cache."""
    num_cached_tokens: int = 0
    """Prompt tokens served by the prefix cache at first scheduling."""
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    sample_seed: int = field(init=False)
    """params.seed, or a random 63-bit seed drawn here so a request samples reproducibly."""
    error: str | None = None
    spec_proposed: int = 0
    """Draft tokens the target verified for this request (speculative decoding)."""
    spec_accepted: int = 0
    """Of those, accepted."""
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sample_seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        # Kept incrementally: the scheduler slices it every step, a concatenation would be O(L).
        self._all_token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output tokens (the live list: read it, never mutate it)."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's name for how it ended: stop, length, abort, error; None while unfinished."""
        return _FINISH_REASONS.get(self.status)

    def is_stop_token(self, token_id: int) -> bool:
        """A token that ends the request without being returned (EOS unless ignore_eos, stop ids)."""
        p = self.params
        return token_id in p.stop_token_ids or (token_id in self.eos_token_ids and not p.ignore_eos)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
