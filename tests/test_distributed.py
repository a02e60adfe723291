"""One model over a 2-rank (and a 4-rank) group on loopback (MLX's ring backend): tensor parallel through mlx-lm's
shard(), pipeline parallel through its pipeline().

The launches are the costly part (each rank imports and loads; ~30-60 s on this 2-core host), so
one `mlx.launch` runs every engine case, and two hand-launched servers cover HTTP, refusal and
failure. Everything else (frames, start-up check, watchdog) is tested in-process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest

from group_fixtures import ROOT, free_port, group_server
from mlx_loom.dist import wire
from mlx_loom.sched.scheduler import ScheduledRow
from tiny_archs import make_tiny_arch_dir

ENGINE_CASES = ("tensor+crowd:llama", "tensor:qwen3", "tensor:qwen3_moe", "pipeline:qwen3_moe",
                "pipeline+crowd:qwen2x4")
"""mode[+crowd]:arch; +crowd also runs dist_driver's preemption crowd (8 requests over too few pages)."""


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {case: make_tiny_arch_dir(root / case, case) for case in ("llama", "qwen3", "qwen3_moe")}
    # 4 layers: each pipeline stage holds 2, so its send hangs off one of its key pools, not every one
    dirs["qwen2x4"] = make_tiny_arch_dir(root / "qwen2x4", "qwen2", overrides={"num_hidden_layers": 4})
    return dirs


def _launch_python() -> list[str]:
    launcher = Path(sys.executable).with_name("mlx.launch")
    return [str(launcher)] if launcher.exists() else [sys.executable, "-m", "mlx.launch"]


def test_greedy_tokens_match_one_process(tmp_path, tiny_dirs):
    """Alone, batched with staggered joins and on a prefix-cache hit, every case gives one process's
    tokens exactly; so do the +crowd cases through preemption by recompute (tensor and pipeline
    parallel). The pipeline crowd is the regression test of a step that left its pool writes lazy:
    recomputed prompts run mid-prompt chunks (no logits) beside decode rows, and that chunk's send /
    recv, evaluated in a later step's graph, paired with the wrong messages (other tokens, or a stall)."""
    cases = [f"{mode}:{tiny_dirs[arch]}" for mode, arch in (c.split(":") for c in ENGINE_CASES)]
    driver = str(ROOT / "tests" / "dist_driver.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    import dist_driver

    dist_driver.main(str(tmp_path / "one.json"), *cases)  # the one-process reference, in this process
    subprocess.run([*_launch_python(), "--backend", "ring", "-n", "2", "--python", sys.executable, driver,
                    str(tmp_path / "two.json"), *cases], env=env, check=True, timeout=600)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    for case in cases:
        assert two[case]["errors"] == [] and two[case]["path"].startswith("generic"), case
        assert two[case]["alone"] == one[case]["alone"], case
        assert two[case]["batched"] == one[case]["batched"], case
        assert two[case]["prefix"] == one[case]["prefix"] and two[case]["prefix_cached"] == 32, case
        assert two[case]["crowd"] == one[case]["crowd"], case
        if "+crowd" in case:
            assert len(two[case]["crowd"]) == 8 and two[case]["preemptions"] >= 1, case
            assert two[case]["preemptions"] == one[case]["preemptions"], case  # the same schedule
        group = two[case]["group"]
        assert group["world_size"] == 2 and group["mode"] == case.split(":")[0].split("+")[0]
        assert group["channel"]["frames"] >= len(one[case]["alone"])


BOOL_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                       "maximum": 9}},
    "required": ["ok", "n"], "additionalProperties": False}}}


def _chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "hi"}], **body})


def test_group_server_serves_json_schema_and_sigterm_stops_every_rank(tmp_path, tiny_dirs):
    with group_server(tmp_path, str(tiny_dirs["qwen3"])) as (url, procs):
        stats = httpx.get(f"{url}/v1/engine/stats", timeout=10).json()
        assert stats["group"]["world_size"] == 2 and stats["group"]["mode"] == "tensor"
        assert [r["kv_heads"] for r in stats["group"]["ranks"]] == [1, 1]  # 2 KV heads, one per rank
        reply = _chat(url, response_format=BOOL_FORMAT, max_tokens=40, temperature=0)
        assert reply.status_code == 200, reply.text
        jsonschema.validate(json.loads(reply.json()["choices"][0]["message"]["content"]),
                            BOOL_FORMAT["json_schema"]["schema"])
        plain = _chat(url, max_tokens=8, temperature=0)
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] >= 1
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert procs[1].wait(30) == 0  # rank 0 told it to stop


def _stream_then(url: str, act) -> tuple[list[str], float]:
    """Start a long streamed request, act() once its first event arrived; (its events, seconds from
    act() to the stream's end)."""
    events: list[str] = []

    def stream() -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                events.append(line)

    reader = threading.Thread(target=stream)
    reader.start()
    while not events and reader.is_alive():
        time.sleep(0.02)
    act()
    t0 = time.monotonic()
    reader.join(60)
    assert not reader.is_alive(), "the in-flight request hung"
    assert any('"error"' in e for e in events), events[-3:]
    assert not any('"finish_reason":"length"' in e.replace(" ", "") for e in events)  # cut, not finished
    return events, time.monotonic() - t0


def test_killed_rank_turns_into_503_and_errors_within_the_bound(tmp_path, tiny_dirs):
    with group_server(tmp_path, str(tiny_dirs["llama"]), ["--group-timeout", "5"]) as (url, procs):
        _, seconds = _stream_then(url, procs[1].kill)
        assert seconds < 5 + 5  # a lost connection is seen at once; the timeout bounds the rest
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "group" in health.text, health.text
        assert _chat(url, max_tokens=4).status_code == 503


def test_stalled_rank_turns_into_503_within_the_group_timeout(tmp_path, tiny_dirs):
    with group_server(tmp_path, str(tiny_dirs["llama"]), ["--group-timeout", "3"]) as (url, procs):
        _, seconds = _stream_then(url, lambda: procs[1].send_signal(signal.SIGSTOP))
        assert seconds < 3 + 5
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "stalled" in health.text, health.text
        procs[1].send_signal(signal.SIGCONT)


def test_a_rank_that_never_starts_ends_rank_0_within_the_start_timeout(tmp_path, tiny_dirs):
    """Rank 1 of 2 never starts: rank 0, held in MLX's wait for its connection (which keeps the GIL,
    so not even /health answers), exits with status 1 once --group-start-timeout passes, its log
    saying what it waited for, instead of hanging."""
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(2)]))
    env = {**os.environ, "MLX_HOSTFILE": str(hostfile), "MLX_RANK": "0", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "rank0.log"
    cmd = [sys.executable, "-m", "mlx_loom", "serve", "--model", str(tiny_dirs["llama"]), "--port", str(free_port()),
           "--no-warmup", "--group-start-timeout", "3"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        assert proc.wait(120) == 1  # a guard against the hang, not a timing
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "every rank must connect within 3s" in text and "_join_or_exit" in text, text[-2000:]


# -- in-process: frames, start-up check, watchdog --

def test_frames_round_trip_with_overflow():
    rows = [ScheduledRow("req-1", tuple(range(600)), 0, tuple(range(38)), True),
            ScheduledRow("req-2", (7,), 41, (3, 9, 4), True, 0),
            ScheduledRow("req-3", (5, 6, 7), 12, (8,), False, 2)]
    payload = wire.encode_rows(rows)
    first, rest = wire.frame(wire.OP_STEP, payload, step=5, count=len(rows))
    assert first.shape == (wire.FRAME,) and rest is not None  # 600 tokens overflow one frame
    header = wire.read_header(first)
    assert (header.op, header.step, header.count) == (wire.OP_STEP, 5, 3)
    back = wire.decode_rows(wire.payload_of(first, header, rest), header.count)
    assert [(r.token_ids, r.start_pos, r.block_ids, r.sample, r.num_draft) for r in back] == \
           [(r.token_ids, r.start_pos, r.block_ids, r.sample, r.num_draft) for r in rows]
    assert len({r.request_id for r in back}) == 3 and back[0].request_id == wire.decode_rows(payload, 3)[0].request_id
    with pytest.raises(wire.FrameError):
        wire.read_header(np.zeros(wire.FRAME, np.int32))


def test_start_up_check_refuses_a_different_rank(tiny_dirs):
    from mlx_loom.dist.load import _fingerprint, _refuse_mismatch
    from mlx_loom.sched.config import CacheConfig, EngineConfig

    path = tiny_dirs["llama"]
    a = _fingerprint(path, EngineConfig(model=str(path)), "tensor", 2)
    assert a == _fingerprint(path, EngineConfig(model="/elsewhere/llama"), "tensor", 2)  # the path may differ
    b = _fingerprint(path, EngineConfig(cache=CacheConfig(block_size=32)), "tensor", 2)
    c = _fingerprint(tiny_dirs["qwen3"], EngineConfig(), "tensor", 2)
    _refuse_mismatch(np.array([a + [0], a + [1]]), 0)
    for other in (b, c):
        with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] started with a different model"):
            _refuse_mismatch(np.array([a + [0], other + [0]]), 0)


def test_unserved_architecture_is_refused_by_name(tiny_dirs):
    from mlx_lm.utils import load_model

    from mlx_loom.dist.load import _check_served
    from mlx_loom.models.layout import UnsupportedModelError

    model, _ = load_model(tiny_dirs["llama"], lazy=True)
    with pytest.raises(UnsupportedModelError, match=r"'llama' cannot be served pipeline parallel.*served: .*qwen2"):
        _check_served(model, "pipeline", 2)
    with pytest.raises(UnsupportedModelError, match=r"splits attention heads evenly"):
        _check_served(model, "tensor", 4)  # 2 KV heads over 4 ranks
    _check_served(model, "tensor", 2)


def test_watchdog_reports_a_stalled_step_once():
    from mlx_loom.dist.watchdog import Watchdog

    class Runner:
        busy_since: float | None = None

    runner, reasons = Runner(), []
    dog = Watchdog(runner, 0.2, reasons.append, world_size=2)
    dog.start()
    time.sleep(0.4)
    assert reasons == []  # idle is not a stall
    runner.busy_since = time.monotonic()
    dog.join(3)
    assert len(reasons) == 1 and "stalled" in reasons[0] and "0.2s" in reasons[0]


def test_four_ranks_give_one_process_tokens(tmp_path):
    """4 ranks on loopback: tensor parallel (llama, 4 KV heads) and pipeline parallel (qwen2, 4 layers)."""
    dirs = {"tensor": make_tiny_arch_dir(tmp_path / "llama4", "llama", overrides={"num_key_value_heads": 4}),
            "pipeline": make_tiny_arch_dir(tmp_path / "qwen2x4", "qwen2", overrides={"num_hidden_layers": 4})}
    cases = [f"{mode}:{path}" for mode, path in dirs.items()]
    driver = str(ROOT / "tests" / "dist_driver.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    import dist_driver

    dist_driver.main(str(tmp_path / "one.json"), *cases)
    subprocess.run([*_launch_python(), "--backend", "ring", "-n", "4", "--python", sys.executable, driver,
                    str(tmp_path / "four.json"), *cases], env=env, check=True, timeout=900)
    one = json.loads((tmp_path / "one.json").read_text())
    four = json.loads((tmp_path / "four.json").read_text())
    for case in cases:
        assert four[case]["errors"] == [], case
        assert four[case]["alone"] == one[case]["alone"], case
        assert four[case]["batched"] == one[case]["batched"], case
        group = four[case]["group"]
        assert group["world_size"] == 4 and group["mode"] == case.split(":")[0]
        assert len(group["ranks"]) == 4
