"""Prefix caching for hybrids: state snapshots at prompt snapshot points, restored on a hit, evicted
with their blocks (pure scheduler), and a 1k-token shared prompt through a tiny qwen3_5 engine."""

from __future__ import annotations

from mlx_loom.sched.block_pool import hash_block_tokens
from mlx_loom.sched.config import CacheConfig, SchedulerConfig
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.request import Request
from mlx_loom.sched.scheduler import Scheduler


def _scheduler(num_blocks: int = 16) -> Scheduler:
    cache = CacheConfig(block_size=4, enable_prefix_caching=True, state_snapshot_interval=2)
    return Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64), cache,
                     num_blocks, num_state_slots=4, num_state_snapshots=4)


def _req(rid: str, prompt: list[int], max_tokens: int = 1) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _step(s: Scheduler):
    out = s.schedule()
    s.update_from_output(out, {r.request_id: [7] for r in out.rows if r.sample})
    return out


def test_snapshot_points_every_interval_and_at_the_last_full_block():
    s = _scheduler()
    assert s.snapshots.points(11, 4) == [8]
    assert s.snapshots.points(21, 4) == [8, 16, 20]
    assert s.snapshots.points(3, 4) == []


def test_chunks_end_at_snapshot_points_and_a_hit_resumes_from_the_snapshot():
    s = _scheduler()
    shared = list(range(10, 20))
    s.add_request(_req("a", shared + [90]))
    (row,) = _step(s).rows
    assert (row.start_pos, len(row.token_ids), row.snapshot_to) == (0, 8, 0)  # cut at the point, snapshotted
    (row,) = _step(s).rows
    assert (row.start_pos, row.snapshot_to, row.sample) == (8, -1, True)
    assert "a" not in s.requests and s.snapshots.num_registered == 1
    s.add_request(_req("b", shared + [91, 92, 93]))
    (row,) = _step(s).rows
    assert (row.start_pos, row.restore_from, row.token_ids) == (8, 0, (18, 19, 91, 92))  # up to its point 12
    assert row.snapshot_to >= 0
    assert s.requests["b"].num_cached_tokens == 8


def test_a_hit_without_a_snapshot_is_not_used():
    s = _scheduler()
    s.add_request(_req("a", list(range(10, 22)), max_tokens=6))  # 12 tokens: points 8 (and 12 = the end)
    for _ in range(8):
        _step(s)
    s.add_request(_req("b", list(range(10, 22)) + [7] * 5 + [50]))  # a's output blocks are cached, unsnapshotted
    (row,) = _step(s).rows
    assert row.start_pos == 12 and row.restore_from >= 0  # the deepest snapshot, not the deepest block


def test_snapshots_are_evicted_with_their_blocks():
    s = _scheduler(num_blocks=6)
    prompt = list(range(10, 21))
    s.add_request(_req("a", prompt))
    _step(s), _step(s)
    a_hash = hash_block_tokens(hash_block_tokens(None, prompt[:4]), prompt[4:8])
    assert s.snapshots.has(a_hash)
    s.add_request(_req("big", list(range(100, 123))))  # needs all 6 blocks: a's cached ones are evicted
    while "big" in s.requests:
        _step(s)
    assert s.kv.pool.get_cached_block(a_hash) is None and not s.snapshots.has(a_hash)


def test_second_request_over_a_1k_shared_prompt_prefills_only_its_suffix(tmp_path):
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    from engine_driver import make_core, run
    from mlx_loom.models.loader import load_model
    from tiny_archs import make_tiny_arch_dir

    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "q", "qwen3_5", overrides={"max_position_embeddings": 2048})))
    assert loaded.max_model_len == 2048  # read from the text config of qwen3_5's vision-language wrapper
    shared = [3 + (13 * i) % 250 for i in range(1024)]
    first, second = shared + [60, 61, 62, 63, 64], shared + [70, 71, 72, 73, 74, 75, 76]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    core = make_core(loaded, budget=256)
    run(core, [("first", first, params)])
    before = core.scheduler.snapshots.num_registered
    result = run(core, [("second", second, params)])["second"]
    assert before >= 1 and result.cached == 1024  # only the 7-token suffix is prefilled
    cold = [int(t) for t, _ in generate_step(mx.array(second), loaded.model, max_tokens=8,
                                             sampler=lambda x: x.argmax(-1))]
    assert result.tokens == cold
