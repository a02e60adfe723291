"""Every rank but 0: run each step rank 0 sends until it says stop (the engine thread of that rank)."""

from __future__ import annotations

import logging

from mlx_loom.dist import wire
from mlx_loom.dist.runner import GroupRunner

log = logging.getLogger("mlx_loom.dist")


def follow(runner: GroupRunner) -> int:
    """Run rank 0's steps on this rank's shard; returns the number of steps run, at OP_STOP.
    Any failure raises: this rank exits, and rank 0's next collective fails loudly."""
    steps = 0
    while True:
        header, payload = runner.channel.receive()
        if header.op == wire.OP_STOP:
            log.info("rank %d: rank 0 stopped after %d steps", runner.channel.rank, steps)
            return steps
        if header.op == wire.OP_STEP:
            runner.execute(wire.decode_rows(payload, header.count))
            steps += 1
        elif header.op == wire.OP_DISCARD:
            runner.discard_derived()
