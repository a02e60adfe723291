"""Rank 0's bound on a stalled group: collective work that runs past the timeout means a rank is
stuck (or gone without closing its sockets); the engine thread is blocked inside MLX and cannot
notice, so this thread reports it once (pure Python: it only reads a timestamp)."""

from __future__ import annotations

import threading
import time
from typing import Callable, Protocol


class Watched(Protocol):
    busy_since: float | None


class Watchdog(threading.Thread):
    def __init__(self, watched: Watched, timeout_s: float, on_stall: Callable[[str], None],
                 world_size: int) -> None:
        super().__init__(name="mlx-loom-group-watchdog", daemon=True)
        self.watched, self.timeout_s, self.on_stall, self.world_size = watched, timeout_s, on_stall, world_size
        self._stop_event = threading.Event()

    def run(self) -> None:
        period = min(0.25, self.timeout_s / 4)
        while not self._stop_event.wait(period):
            since = self.watched.busy_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.on_stall(f"the {self.world_size}-rank group stalled: a step has not finished in "
                              f"{self.timeout_s:g}s (a rank died or is stuck); restart every rank")
                return

    def stop(self) -> None:
        self._stop_event.set()
