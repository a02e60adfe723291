"""The recurrent-state pools of a hybrid model: per state entry, one array per state of mlx-lm's cache.

For each `ArraysCache` entry of the model's cache (models/layout.py `LayerState`), array e of the
pool is [num_slots, *shape_e]: slot s holds request s's conv window / SSM / delta-rule state after
the tokens it has computed. A step reads its rows' slots and writes back what the model wrote
(state_cache.py); the scheduler hands slots out (sched/state_slots.py).
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from mlx_loom.models.layout import LayerState


class StatePools:
    """states[i][e]: [num_slots, *layers[i].shapes[e]] in layers[i].dtypes[e]."""

    def __init__(self, layers: Sequence[LayerState], num_slots: int) -> None:
        self.layers = tuple(layers)
        self.num_slots = num_slots
        self.states = [[mx.zeros((num_slots, *shape), dtype=dtype) for shape, dtype in zip(s.shapes, s.dtypes)]
                       for s in layers]
        mx.eval(self.states)

    @staticmethod
    def bytes_per_slot(layers: Sequence[LayerState]) -> int:
        return sum(s.nbytes for s in layers)

    def arrays(self) -> list[mx.array]:
        """Every pool array (to evaluate a step's writes)."""
        return [a for entry in self.states for a in entry]
