"""Every rank but 0 of a group (`mlx.launch -- mlx-loom serve`): no HTTP, no requests of its own.

It builds the same EngineCore as rank 0 (same shard load, start-up check, self-check and warm-up,
so every collective of start-up lines up), then runs each step rank 0 sends (mlx_loom/dist/follow.py)
until rank 0 stops. This is the process's only MLX thread.
"""

from __future__ import annotations

import logging

from mlx_loom.dist.follow import follow
from mlx_loom.engine.core import EngineCore
from mlx_loom.sched.config import EngineConfig

log = logging.getLogger("mlx_loom.engine")


def run_follower(config: EngineConfig) -> int:
    """Serve rank 0's steps; returns the number of steps run (raises on any failure)."""
    core = EngineCore(config)
    if core.group is None:
        raise RuntimeError("run_follower needs a multi-rank launch (mlx.launch)")
    if config.warmup:
        core.warm_up()
    log.info("rank %d ready: following rank 0", core.group.rank)
    return follow(core.group.runner)
