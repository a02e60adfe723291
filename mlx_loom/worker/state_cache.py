"""mlx-lm's ArraysCache protocol over the state pools: one state entry's view for one model call.

An mlx-lm SSM / linear-attention layer reads `cache[e]` (None: start from zeros), writes
`cache[e] = new_state`, reads `cache.lengths` (None: every row's L tokens are real) and calls
`cache.advance(L)`; its model calls `cache.make_mask(L)` (None: no padding). `SlotStateCache`
answers these for B rows of L tokens each: `cache[e]` is the rows' slots gathered ([B, *shape]),
zeros for rows that start a sequence, and `commit` writes what the call left in `cache[e]` back to
the rows' slots. All rows of a call have the same L and no padding, so no lengths or masks are
needed. Nothing of mlx-lm is patched (the class subclasses mlx-lm's public ArraysCache).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.state_pools import StatePools


class StateOutOfStepError(RuntimeError):
    """A row resumes at a position its slot's state is not at (a failed step advanced it): that request
    fails alone rather than continue from a wrong state."""


class StateShapeError(RuntimeError):
    """The model wrote a state of another shape than its slots hold (a state that grows with the tokens
    seen): the step fails rather than broadcast it into the slots."""


class SlotStateCache(ArraysCache):
    """State entry `index` of `pools` for the rows of one call (the ArraysCache protocol; a subclass, as
    some models test `isinstance(cache, ArraysCache)` before writing their state)."""

    def __init__(self, pools: StatePools, index: int, rows: Sequence[ScheduledRow]) -> None:
        super().__init__(len(pools.layers[index].shapes))  # lengths, left_padding: None (no padding)
        self.pools = pools
        self.index = index
        self.slots = mx.array([r.state_slot for r in rows], dtype=mx.int32)  # [B]
        assert all(r.state_slot >= 0 for r in rows), "every row of a hybrid model holds a state slot"
        self.ends = [(r.state_slot, r.start_pos + len(r.token_ids)) for r in rows]
        for r in rows:
            held = pools.positions[r.state_slot]
            if r.start_pos and held is not None and held != r.start_pos:
                raise StateOutOfStepError(f"request {r.request_id}: its recurrent state holds {held} tokens but the "
                                          f"step resumes at {r.start_pos} (an earlier step failed after advancing it)")
        fresh = [r.start_pos == 0 for r in rows]
        self.cache: list[mx.array | None] = [None] * len(pools.layers[index].shapes)
        if not all(fresh):  # all fresh: None, exactly as mlx-lm's own first call
            keep = mx.array([not f for f in fresh])  # [B] rows that continue their state
            for e, pool in enumerate(pools.states[index]):
                gathered = pool[self.slots]  # [B, *shape]
                self.cache[e] = gathered if all(not f for f in fresh) else mx.where(
                    keep.reshape(-1, *([1] * (gathered.ndim - 1))), gathered, mx.zeros_like(gathered))

    def inputs(self) -> list[mx.array]:
        """The gathered states the call starts from. Evaluate them before the call: a pool read in the
        same graph as its write keeps MLX from writing it in place (a copy of the whole pool per step)."""
        return [a for a in self.cache if a is not None]

    def __getitem__(self, e: int) -> mx.array | None:
        return self.cache[e]

    def __setitem__(self, e: int, value: mx.array) -> None:
        self.cache[e] = value

    @property
    def batch_size(self) -> int:
        return self.slots.size

    def empty(self) -> bool:
        return self.cache[0] is None

    def advance(self, n: int) -> None:
        pass  # no lengths or padding to move

    def make_mask(self, n: int, **_: object) -> None:
        return None  # no padding: every token of every row is real

    def commit(self) -> None:
        """Write the states the call left in cache[e] ([B, *shape]) back to the rows' slots."""
        pools = self.pools.states[self.index]
        for e, value in enumerate(self.cache):
            if value is not None:
                if tuple(value.shape) != (self.batch_size, *pools[e].shape[1:]):  # would broadcast into the slots
                    raise StateShapeError(f"state entry {self.index}.{e}: the model wrote shape {tuple(value.shape)} "
                                          f"for {self.batch_size} rows; its slots hold {tuple(pools[e].shape[1:])}")
                pools[e][self.slots] = value.astype(pools[e].dtype)
        for slot, end in self.ends:
            self.pools.positions[slot] = end
