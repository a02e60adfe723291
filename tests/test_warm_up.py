"""Warm-up before ready: every decode batch bucket, a prefill chunk and the sampler run once before
/health says 200; nothing is left behind; a failing warm-up keeps the server at 503 with the reason."""

from __future__ import annotations

import threading
import time

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import httpx
import pytest

from engine_driver import make_core, run
from mlx_loom.engine import core as engine_core
from mlx_loom.models.loader import load_model
from mlx_loom.sched.params import SamplingParams
from mlx_loom.engine.warm_up import batch_buckets
from mlx_loom.server.app import create_app
from mlx_loom.server.settings import Settings
from server_fixtures import serve_in_thread
from tiny_archs import make_tiny_arch_dir


@pytest.mark.parametrize("max_num_seqs,num_blocks,expect", [
    (128, 1000, (1, 2, 4, 8, 16, 32, 64, 128)),
    (6, 1000, (1, 2, 4, 6)),
    (128, 5, (1, 2, 4, 5)),
    (1, 1000, (1,)),
    (8, 8, (1, 2, 4, 8)),
])
def test_batch_buckets(max_num_seqs, num_blocks, expect):
    assert batch_buckets(max_num_seqs, num_blocks) == expect


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(make_tiny_arch_dir(tmp_path_factory.mktemp("warm") / "q", "qwen3")))


def _requests() -> list:
    greedy = SamplingParams(max_tokens=12, temperature=0)
    seeded = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=7, logprobs=True)
    return [("a", [11, 12, 13, 14, 15, 16, 17], greedy), ("b", [21, 22, 23] * 9, seeded), ("c", [5], greedy)]


@pytest.mark.parametrize("generic", [False, True], ids=["fast-path", "model-own-code"])
def test_warm_up_runs_every_shape_and_leaves_nothing_behind(tiny, generic, monkeypatch):
    monkeypatch.setenv("MLX_LOOM_GENERIC_FORWARD", "1" if generic else "0")
    cold = make_core(tiny, num_blocks=64, max_num_seqs=8, budget=64)
    warm = make_core(tiny, num_blocks=64, max_num_seqs=8, budget=64)
    assert (warm.runner.generic is not None) == generic
    calls = []
    execute = warm.runner.execute
    monkeypatch.setattr(warm.runner, "execute", lambda rows, tokens=None: calls.append(
        [len(r.token_ids) for r in rows]) or execute(rows, tokens))
    result = warm.warm_up()
    monkeypatch.setattr(warm.runner, "execute", execute)
    assert result.batch_sizes == (1, 2, 4, 8) and result.prefill_tokens == 64
    assert calls == [[1], [1] * 2, [1] * 4, [1] * 8, [64]]
    assert warm.info.warmup_seconds == result.seconds > 0 and cold.info.warmup_seconds is None
    stats = warm.stats()
    assert stats.num_blocks_free == 64 and stats.steps == 0 and not warm.has_unfinished()
    assert warm.scheduler.kv.pool.num_cached_blocks == 0
    # the pages the warm-up wrote are rewritten before they are read: same tokens and logprobs as a cold engine
    got, expect = run(warm, _requests()), run(cold, _requests())
    for rid in expect:
        assert got[rid].tokens == expect[rid].tokens
        assert [lp.logprob for lp in got[rid].logprobs] == pytest.approx([lp.logprob for lp in expect[rid].logprobs],
                                                                          abs=1e-5)


def _wait_health(base: str, status: int, timeout: float = 60) -> httpx.Response:
    deadline = time.time() + timeout
    while True:
        r = httpx.get(base + "/health")
        if r.status_code == status or time.time() > deadline:
            return r
        time.sleep(0.05)


def test_health_is_503_until_the_warm_up_is_done(tmp_path, monkeypatch):
    release, warming = threading.Event(), threading.Event()
    real = engine_core.warm_up

    def held(*args, **kwargs):
        warming.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_core, "warm_up", held)
    path = make_tiny_arch_dir(tmp_path / "l", "llama")
    with serve_in_thread(create_app(Settings(model=str(path)))) as base:
        assert warming.wait(60)
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and "warming up" in r.json()["error"]["message"]
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(base + "/v1/chat/completions", json=chat).status_code == 503
        release.set()
        assert _wait_health(base, 200).status_code == 200
        stats = httpx.get(base + "/v1/engine/stats").json()
        assert stats["warmup_seconds"] > 0
        assert httpx.post(base + "/v1/chat/completions", json=chat, timeout=60).status_code == 200


def test_no_warmup_flag_skips_it(tmp_path):
    path = make_tiny_arch_dir(tmp_path / "l", "llama")
    with serve_in_thread(create_app(Settings(model=str(path), warmup=False))) as base:
        assert _wait_health(base, 200).status_code == 200
        assert httpx.get(base + "/v1/engine/stats").json()["warmup_seconds"] is None


def test_a_failing_warm_up_keeps_the_server_at_503_with_the_reason(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel compile failed")

    monkeypatch.setattr(engine_core, "warm_up", broken)
    path = make_tiny_arch_dir(tmp_path / "l", "llama")
    with serve_in_thread(create_app(Settings(model=str(path)))) as base:
        deadline = time.time() + 60
        while "failed" not in (r := httpx.get(base + "/health")).text and time.time() < deadline:
            time.sleep(0.05)
        assert r.status_code == 503
        assert "failed to warm up: kernel compile failed" in r.json()["error"]["message"]
