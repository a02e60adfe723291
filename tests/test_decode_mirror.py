"""The generic path's decode mirror: the dense KV copy of the decode group kept across steps must show the
model's attention exactly the keys the page gather would, through joins, leaves, growth, rollbacks and
failures, and must stay within its byte cap (falling back to the gather)."""

from __future__ import annotations

import random

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import pytest

from engine_driver import run
from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
from mlx_loom.worker.decode_mirror import DecodeMirror
from mlx_loom.engine.core import EngineCore
from mlx_loom.models.loader import load_model
from mlx_loom.models.layout import LayerKV
from mlx_loom.worker.kv_pools import KVPools
from mlx_loom.worker.paged_cache import PagedLayerCache, paged_batch
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.scheduler import ScheduledRow
from tiny_archs import make_tiny_arch_dir

BS = 4
LAYERS = [LayerKV(2, 3, 3), LayerKV(1, 4, 2)]  # two layers of different shapes (MLA-like values)


def _call(pools: KVPools, rows: list[ScheduledRow], mirror: DecodeMirror | None, new: dict[str, mx.array]):
    """One decode call over every layer; returns (rows in call order, per layer (keys, values), plan)."""
    plan = mirror.plan(rows) if mirror is not None else None
    if plan is not None:
        rows = [rows[i] for i in plan.order]
    batch = paged_batch(rows, BS)
    out = []
    for j, layer in enumerate(pools.layers):
        cache = PagedLayerCache(pools, j, batch, (mirror, plan) if plan is not None else None)
        k = mx.stack([new[r.request_id][j][0] for r in rows])  # [B, HKV, 1, Dk]
        v = mx.stack([new[r.request_id][j][1] for r in rows])
        out.append(cache.update_and_fetch(k, v))
        assert cache.make_mask(1).shape[-1] == out[-1][0].shape[2]  # the mask covers exactly what is fetched
    if mirror is not None:
        mirror.finish()
    return rows, out, plan


def _new_kv(rid: str, step: int) -> list[tuple[mx.array, mx.array]]:
    mx.random.seed(hash((rid, step)) % 2**31)
    return [(mx.random.normal((s.kv_heads, 1, s.k_dim)), mx.random.normal((s.kv_heads, 1, s.v_dim))) for s in LAYERS]


def test_mirror_shows_the_same_keys_as_the_gather_through_joins_leaves_growth_and_rollbacks():
    rng = random.Random(0)
    pools = [KVPools(LAYERS, num_blocks=512, block_size=BS, dtype=mx.float32) for _ in range(2)]
    mirror = DecodeMirror(pools[1], max_bytes=1 << 30)
    live: dict[str, int] = {}  # request -> next position
    pages: dict[str, tuple[int, ...]] = {}
    next_page = iter(range(512))
    kinds = set()
    for step in range(40):
        for rid in list(live):
            if rng.random() < 0.1:  # leaves
                del live[rid]
            elif rng.random() < 0.05:  # rolled back (a rejected draft): the mirror must not trust its copy
                live[rid] = max(1, live[rid] - 2)
        while len(live) < 6 or rng.random() < 0.2:  # joins at some position its pages already hold
            rid = f"r{step}-{len(live)}"
            live[rid] = rng.randrange(1, 9)
            pages[rid] = tuple(next(next_page) for _ in range(4))  # 16 positions
        rows = [ScheduledRow(rid, (0,), pos, pages[rid], True) for rid, pos in live.items()]
        rng.shuffle(rows)
        new = {r.request_id: _new_kv(r.request_id, r.start_pos) for r in rows}
        ref_rows, ref, _ = _call(pools[0], rows, None, new)
        got_rows, got, plan = _call(pools[1], rows, mirror, new)
        kinds.add("rebuild" if plan.rebuild is not None else "fill" if plan.fill_slots else "kept")
        by_id = {r.request_id: b for b, r in enumerate(got_rows)}
        for (rk, rv), (gk, gv) in zip(ref, got):
            for b, r in enumerate(ref_rows):
                g = by_id[r.request_id]
                assert mx.array_equal(rk[b, :, : r.start_pos + 1], gk[g, :, : r.start_pos + 1]), (step, r)
                assert mx.array_equal(rv[b, :, : r.start_pos + 1], gv[g, :, : r.start_pos + 1]), (step, r)
        mx.eval(pools[0].k, pools[0].v, pools[1].k, pools[1].v, mirror.k, mirror.v)
        for r in rows:
            live[r.request_id] = r.start_pos + 1
        live = {rid: pos for rid, pos in live.items() if pos < 15}
    assert kinds == {"rebuild", "fill", "kept"}


def test_rows_keep_their_slots_and_only_newcomers_are_copied_in():
    pools = KVPools(LAYERS, num_blocks=64, block_size=BS, dtype=mx.float32)
    mirror = DecodeMirror(pools, max_bytes=1 << 30)
    rows = [ScheduledRow(f"r{i}", (0,), 3 + i, (2 * i, 2 * i + 1), True) for i in range(8)]
    first = mirror.plan(rows)
    assert first.rebuild is not None and mirror.slots == 16  # twice the rows
    step = [ScheduledRow(r.request_id, (0,), r.start_pos + 1, r.block_ids, True) for r in rows[2:]]
    step.append(ScheduledRow("new", (0,), 2, (20, 21), True))
    plan = mirror.plan(step)
    assert plan.rebuild is None
    # slots 0..6: rows r2..r7 that sat below 7 stay; r7 (slot 7) and the newcomer move into the freed slots 0, 1
    held = {step[i].request_id: s for s, i in enumerate(plan.order)}
    assert all(held[f"r{i}"] == i for i in range(2, 7))
    assert {held["r7"], held["new"]} == {0, 1} and set(plan.fill_slots) == {0, 1}


def test_a_group_over_the_cap_uses_the_gather_and_frees_the_mirror():
    pools = KVPools(LAYERS, num_blocks=64, block_size=BS, dtype=mx.float32)
    column = sum(s.kv_heads * (s.k_dim + s.v_dim) for s in LAYERS) * 4
    mirror = DecodeMirror(pools, max_bytes=3 * 72 * column)  # 3 slots of 72 positions, no more
    two = [ScheduledRow("a", (0,), 5, (0, 1), True), ScheduledRow("b", (0,), 6, (2, 3), True)]
    assert mirror.plan(two) is not None  # the smaller room: a quarter more slots (one), 64 more columns
    assert (mirror.slots, mirror.cols) == (3, 72) and mirror.nbytes <= mirror.max_bytes
    over = [ScheduledRow("a", (0,), 9, (0, 1, 4), True), ScheduledRow("c", (0,), 20, tuple(range(5, 11)), True),
            ScheduledRow("b", (0,), 7, (2, 3), True)]
    assert mirror.plan(over) is not None  # three rows still fit the columns it has
    longer = [ScheduledRow("a", (0,), 80, tuple(range(20, 41)), True)]
    assert mirror.plan(longer) is None  # 81 positions need a rebuild with room: over the cap
    assert mirror.slots == 0 and mirror.k == [None, None]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    """A generic-path model with sliding-window layers (window 8) next to full ones."""
    return load_model(make_tiny_arch_dir(tmp_path_factory.mktemp("gemma3"), "gemma3_text"))


def _core(loaded, dense_gb: float | None, num_blocks: int = 128) -> EngineCore:
    return EngineCore(EngineConfig(
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, dense_decode_kv_gb=dense_gb),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)), loaded)


def _requests(vocab: int) -> list:
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=True, top_logprobs=3)
    return [(f"q{i}", [(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(9 + 11 * i)], params) for i in range(5)]


def test_engine_tokens_and_logprobs_are_the_same_with_and_without_the_mirror(gemma3):
    reqs = _requests(gemma3.vocab_size)
    joins = {"q0": 0, "q1": 3, "q2": 3, "q3": 9, "q4": 14}
    core = _core(gemma3, None)
    assert core.runner.generic is not None and core.runner.generic.mirror is not None
    got = run(core, reqs, join_step=joins)
    assert core.runner.generic.mirror.slots > 0  # the decode steps ran on the mirror
    off = _core(gemma3, 0)
    assert off.runner.generic.mirror is None  # 0 turns it off
    expected = run(off, reqs, join_step=joins)
    tight = _core(gemma3, None, num_blocks=9)  # preemptions: rows leave and come back
    preempted = run(tight, reqs, join_step=joins)
    assert tight.stats().num_preemptions > 0
    for rid, want in expected.items():
        for res in (got[rid], preempted[rid]):
            assert res.tokens == want.tokens, rid
            assert len(res.logprobs) == len(want.logprobs) == 20
            for a, b in zip(res.logprobs, want.logprobs):
                assert [t for t, _ in a.top] == [t for t, _ in b.top], rid
                # float32: attention over another number of (masked) columns sums in another order
                assert max(abs(x - y) / max(1.0, abs(y)) for (_, x), (_, y) in zip(a.top, b.top)) <= 1e-4, rid


def test_a_failure_inside_a_mirrored_call_leaves_the_rest_correct(gemma3, monkeypatch):
    reqs = _requests(gemma3.vocab_size)[:3]
    expected = run(_core(gemma3, 0), reqs)
    core = _core(gemma3, None)
    update = DecodeMirror.update
    calls = {"n": 0}

    def failing(self, layer, plan, keys, values):
        calls["n"] += 1
        if calls["n"] == 3 * len(self.pools.layers) + 1:  # the fourth decode call, first layer
            raise RuntimeError("injected failure")
        return update(self, layer, plan, keys, values)

    monkeypatch.setattr(DecodeMirror, "update", failing)
    got = run(core, reqs)
    assert calls["n"] > 3 * len(core.runner.pools.layers) + 1  # the failure was injected, and steps went on
    # the step fails, its rows are retried one by one (the mirror starts over), and all finish unchanged
    assert {rid: r.tokens for rid, r in got.items()} == {rid: r.tokens for rid, r in expected.items()}
    assert all(r.error is None for r in got.values())
