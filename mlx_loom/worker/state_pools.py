"""The recurrent-state pools of a hybrid model: per state entry, one array per state of mlx-lm's cache.

For each `ArraysCache` entry of the model's cache (models/layout.py `LayerState`), array e of the
pool is [num_slots, *shape_e]: slot s holds request s's conv window / SSM / delta-rule state after
the tokens it has computed. A step reads its rows' slots and writes back what the model wrote
(state_cache.py); the scheduler hands slots out (sched/state_slots.py).

With prefix caching, `snapshots[i][e]` [num_snapshots, *shape_e] keeps states at prompt snapshot
points (sched/state_snapshots.py): a row's state is copied there after the step that reaches the
point, and copied back into a new row's slot before the step that resumes from a prefix hit.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from mlx_loom.models.layout import LayerState
from mlx_loom.sched.scheduler import ScheduledRow


class StatePools:
    """states[i][e]: [num_slots, *layers[i].shapes[e]] in layers[i].dtypes[e]."""

    def __init__(self, layers: Sequence[LayerState], num_slots: int, num_snapshots: int = 0) -> None:
        self.layers = tuple(layers)
        self.num_slots = num_slots
        self.states = _zeros(layers, num_slots)
        self.snapshots = _zeros(layers, num_snapshots) if num_snapshots > 0 else None
        mx.eval(self.states, self.snapshots or [])
        self.positions: list[int | None] = [None] * num_slots
        """Per slot: how many tokens its state holds, as far as the steps written so far say (None:
        unknown, e.g. scratch rows). A state cannot be rewound, so a row resuming at another position
        (its state was advanced by a step that failed later) must fail, not run on a wrong state."""

    def forget_positions(self) -> None:
        """Scratch rows (self-check, warm-up) leave nothing a request resumes from."""
        self.positions = [None] * self.num_slots

    def restore(self, rows: Sequence[ScheduledRow]) -> None:
        """Before a step: rows resuming from a prefix hit get their snapshot in their state slot."""
        pairs = [(r.state_slot, r.restore_from) for r in rows if r.restore_from >= 0]
        if pairs:
            self._copy(self.snapshots, self.states, pairs)
        for r in rows:
            if r.restore_from >= 0:
                self.positions[r.state_slot] = r.start_pos

    def snapshot(self, rows: Sequence[ScheduledRow]) -> None:
        """After a step: rows that reached a snapshot point copy their state to their snapshot slot."""
        pairs = [(r.snapshot_to, r.state_slot) for r in rows if r.snapshot_to >= 0]
        if pairs:
            self._copy(self.states, self.snapshots, pairs)

    @staticmethod
    def _copy(src: list[list[mx.array]], dst: list[list[mx.array]], pairs: list[tuple[int, int]]) -> None:
        """dst[i][e][to] = src[i][e][from] for every (to, from) pair, every entry."""
        to = mx.array([t for t, _ in pairs], dtype=mx.int32)  # [R]
        frm = mx.array([f for _, f in pairs], dtype=mx.int32)  # [R]
        for src_layer, dst_layer in zip(src, dst):
            for e, array in enumerate(src_layer):
                dst_layer[e][to] = array[frm]

    @staticmethod
    def bytes_per_slot(layers: Sequence[LayerState]) -> int:
        return sum(s.nbytes for s in layers)

    def arrays(self) -> list[mx.array]:
        """Every pool array (to evaluate a step's writes)."""
        return [a for layer in (*self.states, *(self.snapshots or ())) for a in layer]


def _zeros(layers: Sequence[LayerState], n: int) -> list[list[mx.array]]:
    return [[mx.zeros((n, *shape), dtype=dtype) for shape, dtype in zip(s.shapes, s.dtypes)] for s in layers]
