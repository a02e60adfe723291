"""Rank 0 -> every rank, once per step: the wire frames over `mx.distributed` (engine thread only).

A broadcast is an `all_sum` in which only rank 0 contributes (the others add zeros), so it works on
every backend MLX has (ring, JACCL, MPI, NCCL) without a transport of ours. Each call is counted:
frames, payload bytes and the seconds spent, for /v1/engine/stats and the benchmark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_loom.dist import wire


@dataclass
class ChannelStats:
    messages: int = 0  # all_sum calls
    frames: int = 0  # steps, pings, stops
    bytes: int = 0  # int32 bytes each rank contributes (a ring all_sum moves ~2 (N-1)/N of it per rank)
    seconds: float = 0.0


class StepChannel:
    def __init__(self, group: mx.distributed.Group) -> None:
        self.group = group
        self.rank = group.rank()
        self.stats = ChannelStats()
        self.step = 0

    def send(self, op: int, payload: np.ndarray | None = None, count: int = 0) -> None:
        """Rank 0: one frame (and its overflow) to every rank."""
        assert self.rank == 0
        self.step += 1
        first, rest = wire.frame(op, np.zeros(0, np.int32) if payload is None else payload, self.step, count)
        self._sum(first)
        if rest is not None:
            self._sum(rest)
        self.stats.frames += 1

    def receive(self) -> tuple[wire.Header, np.ndarray]:
        """Other ranks: the next frame's header and payload (blocks until rank 0 sends one)."""
        first = self._sum(np.zeros(wire.FRAME, dtype=np.int32))
        header = wire.read_header(first)
        rest = None
        if header.length > wire.FRAME - wire.HEADER:
            rest = self._sum(np.zeros(header.length - (wire.FRAME - wire.HEADER), dtype=np.int32))
        self.stats.frames += 1
        return header, wire.payload_of(first, header, rest)

    def _sum(self, values: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = mx.distributed.all_sum(mx.array(values), group=self.group, stream=mx.cpu)
        mx.eval(out)
        self.stats.messages += 1
        self.stats.bytes += values.nbytes
        self.stats.seconds += time.perf_counter() - t0
        return np.array(out)
