"""The model runner of a rank in the group: the one-process runner plus the step frame.

Rank 0 (once serving) sends each step's rows to every rank before running it; the other ranks run
the rows they receive (follow.py). Every rank then evaluates exactly the same arrays (the logits
when a row samples, else the KV pools), so the collectives inside the model's own sharded code
(`all_sum` of the `sharded-to-all` projections, the pipeline's send / recv / all_gather) run in
the same order everywhere.

The forward is always the generic path (the model's own code): the flattened llama path and the
fused native decode layer assume whole, unsharded layers (their own projections, no collectives).
"""

from __future__ import annotations

import time
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.dist import wire
from mlx_loom.dist.channel import StepChannel
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.runner import ModelRunner


class GroupFailure(BaseException):
    """A step of the group failed on rank 0: a rank is gone or out of step, so no later step can be
    trusted. A BaseException on purpose: the engine's per-request retry (which catches Exception)
    must not retry it; the engine thread ends, failing every request, and /health turns 503."""


class GroupRunner(ModelRunner):
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: mx.Dtype, *,
                 channel: StepChannel, dense_decode_bytes: int | None = None) -> None:
        super().__init__(model, num_blocks, block_size, dtype, force_generic=True,
                         dense_decode_bytes=dense_decode_bytes)
        self.channel = channel
        self.leading = False
        """Rank 0 once serving: every step, discard and ping goes to the group first."""
        self.busy_since: float | None = None
        """time.monotonic() when the current collective work began; None while idle (watchdog.py)."""

    @property
    def path(self) -> str:
        return "generic (model's own sharded code)"

    def execute(self, rows: Sequence[ScheduledRow], tokens: mx.array | None = None) -> tuple[mx.array, tuple[int, ...]]:
        assert tokens is None, "device tokens are not sent to the group (async decode is off)"
        with self._busy():
            if self.leading:
                self.channel.send(wire.OP_STEP, wire.encode_rows(rows), len(rows))
            logits, sample_rows = super().execute(rows)
            # Logits and every pool, always: a write left lazy would carry this step's collectives
            # into a later graph, where their order against that step's is MLX's traversal, not
            # the same on every rank (pipeline: send and recv sides differ) -> wrong tokens or a stall.
            mx.eval(logits, self.pool_arrays())
        return logits, sample_rows

    def discard_derived(self) -> None:
        if self.leading:
            with self._busy():
                self.channel.send(wire.OP_DISCARD)
        super().discard_derived()

    def ping(self) -> None:
        """Rank 0, idle: prove every rank still answers (a dead one raises GroupFailure here)."""
        with self._busy():
            self.channel.send(wire.OP_PING)

    def close(self) -> None:
        """Rank 0, shutting down: every other rank leaves its loop and exits."""
        if self.leading:
            self.leading = False
            with self._busy():
                self.channel.send(wire.OP_STOP)

    def _busy(self) -> "_Busy":
        return _Busy(self)


class _Busy:
    """Marks collective work for the watchdog; on rank 0 any failure inside becomes GroupFailure."""

    def __init__(self, runner: GroupRunner) -> None:
        self.runner = runner

    def __enter__(self) -> None:
        self.runner.busy_since = time.monotonic()

    def __exit__(self, kind, exc, tb) -> bool:
        self.runner.busy_since = None
        if exc is not None and isinstance(exc, Exception) and self.runner.leading:
            raise GroupFailure(f"a step of the {self.runner.channel.group.size()}-rank group failed "
                               f"({type(exc).__name__}: {exc}); a rank died or is out of step") from exc
        return False
