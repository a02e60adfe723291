"""Joining the group: which ranks exist, what this one loads, its runner, and rank 0's watch."""

from __future__ import annotations

import faulthandler
import logging
from dataclasses import asdict
from typing import Callable

import mlx.core as mx

from mlx_loom.dist.channel import StepChannel
from mlx_loom.dist.load import GroupModel, load_group_model
from mlx_loom.dist.runner import GroupRunner
from mlx_loom.dist.watchdog import Watchdog
from mlx_loom.sched.config import EngineConfig

log = logging.getLogger("mlx_loom.dist")

HEARTBEAT_S = 1.0
"""Rank 0 pings the group this often while idle, so a rank that dies between requests is seen."""


class Group:
    """This process's place in the group: the shard, the step channel, the runner once built."""

    def __init__(self, model: GroupModel) -> None:
        self.model = model
        self.channel = StepChannel(model.group)
        self.runner: GroupRunner | None = None
        self.watchdog: Watchdog | None = None

    @property
    def rank(self) -> int:
        return self.model.rank

    def make_runner(self, num_blocks: int, block_size: int, dtype: mx.Dtype,
                    dense_decode_bytes: int | None) -> GroupRunner:
        self.runner = GroupRunner(self.model.loaded.model, num_blocks, block_size, dtype, channel=self.channel,
                                  dense_decode_bytes=dense_decode_bytes)
        return self.runner

    def lead(self, timeout_s: float, on_stall: Callable[[str], None]) -> None:
        """Rank 0, after start-up: send every step from now on, under the watchdog's bound."""
        assert self.rank == 0 and self.runner is not None
        self.runner.leading = True
        self.watchdog = Watchdog(self.runner, timeout_s, on_stall, self.model.group.size())
        self.watchdog.start()

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.runner is not None:
            self.runner.close()

    def describe(self) -> dict:
        return {**self.model.describe(), "channel": asdict(self.channel.stats)}


def open_group(config: EngineConfig) -> Group | None:
    """Every rank: None when this process is alone; else load this rank's shard and agree on it."""
    group = _join_or_exit(config.group_start_timeout_s)
    if group.size() == 1:
        return None
    refused = [what for what, on in (("speculative decoding", config.spec.method is not None),
                                      ("sparse prefill", config.sparse_prefill != "off")) if on]
    if refused:
        raise ValueError(f"{' and '.join(refused)} run in one process only; not over {group.size()} ranks")
    model = load_group_model(config, config.parallel or "tensor", group)
    log.info("rank %d of %d: %s parallel, %s", group.rank(), group.size(), model.mode,
             model.shares[group.rank()].describe(model.mode))
    return Group(model)


def _join_or_exit(timeout_s: float) -> mx.distributed.Group:
    """`mx.distributed.init()` under a bound. MLX's ring backend has rank 0 wait for the other ranks'
    connections with no timeout, holding the GIL: no Python thread runs meanwhile (not the HTTP
    server, not a watchdog), so a rank that never starts would freeze rank 0 for good. Only
    faulthandler's C thread still runs: past timeout_s it prints every thread's stack and exits 1.
    (It is the process's one timed dump: one armed before is cancelled.)"""
    log.info("joining the group: every rank must connect within %gs (--group-start-timeout), else this "
             "process exits with status 1", timeout_s)
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        return mx.distributed.init()
    finally:
        faulthandler.cancel_dump_traceback_later()
