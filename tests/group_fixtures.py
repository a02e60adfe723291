"""Launch a group of mlx-loom ranks on loopback with MLX's ring backend, by hand.

Exactly what `mlx.launch --backend ring -n N` sets up (a JSON hostfile in MLX_HOSTFILE, MLX_RANK
per process), minus the launcher, which would SIGTERM rank 0 as soon as another rank dies: the
failure tests need rank 0 to outlive a killed rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def group_server(tmp: Path, model: str, args: Sequence[str] = (), size: int = 2,
                 ready_timeout: float = 240.0) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """(base url of rank 0, the rank processes); every rank is stopped on exit."""
    hostfile = tmp / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(size)]))
    port = free_port()
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mlx_loom", "serve", "--model", model, "--port", str(port), "--no-warmup",
           "--num-blocks", "64", "--max-num-seqs", "4", *args]
    procs = [subprocess.Popen(cmd, env={**env, "MLX_RANK": str(r)}, stdout=(tmp / f"rank{r}.log").open("w"),
                              stderr=subprocess.STDOUT) for r in range(size)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, procs, ready_timeout)
        yield url, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


def wait_healthy(url: str, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank exited during start-up: {[p.poll() for p in procs]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError("the group did not become healthy")
