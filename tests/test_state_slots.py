"""Recurrent-state slots of hybrid models: the pure slot pool and scheduler admission (no model), and
200 concurrent requests through an engine whose pool holds 32 slots (tiny qwen3_5)."""

from __future__ import annotations

import pytest

from mlx_loom.sched.config import CacheConfig, SchedulerConfig
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.request import Request
from mlx_loom.sched.scheduler import Scheduler
from mlx_loom.sched.state_slots import StateSlots


def _scheduler(num_slots: int, num_blocks: int = 64, max_seqs: int = 8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=64, max_model_len=128),
                     CacheConfig(block_size=4, enable_prefix_caching=False), num_blocks, num_state_slots=num_slots)


def _req(rid: str, n: int = 5, max_tokens: int = 3) -> Request:
    return Request(rid, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _step(s: Scheduler):
    out = s.schedule()
    s.update_from_output(out, {r.request_id: [7] for r in out.rows if r.sample})
    return out


def test_slots_are_handed_out_and_reused():
    slots = StateSlots(2)
    assert (slots.allocate("a"), slots.allocate("b"), slots.num_free) == (0, 1, 0)
    with pytest.raises(ValueError):
        slots.allocate("c")
    slots.free("a")
    assert slots.allocate("c") == 0 and slots.slot_of("b") == 1 and slots.slot_of("a") is None


def test_admission_waits_for_a_slot_and_rows_carry_theirs():
    s = _scheduler(num_slots=2)
    for rid in "abc":
        s.add_request(_req(rid))
    out = _step(s)
    assert [(r.request_id, r.state_slot) for r in out.rows] == [("a", 0), ("b", 1)]
    assert s.num_waiting == 1  # c waits although rows and blocks are free
    while "a" in s.requests:
        _step(s)
    assert s.num_waiting == 1 and s.state_slots.num_free == 2  # a and b finished in the same step
    out = _step(s)
    assert [r.request_id for r in out.rows] == ["c"] and out.rows[0].state_slot in (0, 1)


def test_abort_and_preemption_give_the_slot_back():
    s = _scheduler(num_slots=2)
    s.add_request(_req("a"))
    s.add_request(_req("b"))
    _step(s)
    s.abort_request("a")
    assert s.state_slots.num_free == 1
    s._preempt(s.running.pop())  # as _allocate_or_preempt does
    assert s.state_slots.num_free == 2 and s.waiting[0].request_id == "b"
    out = _step(s)
    assert [(r.request_id, r.start_pos, r.state_slot) for r in out.rows] == [("b", 0, 1)]  # recompute from zero


def test_two_hundred_requests_share_thirty_two_slots(tmp_path):
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from engine_driver import run
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.models.loader import load_model
    from mlx_loom.sched.config import EngineConfig
    from tiny_archs import make_tiny_arch_dir

    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "qwen3_5", "qwen3_5")))
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=512, num_state_slots=32),
                       scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=256), warmup=False)
    core = EngineCore(cfg, loaded)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    prompts = [[20 + i % 7, 30 + i % 11, 40 + i % 13] for i in range(200)]
    solo = run(core, [("solo", prompts[5], params)])["solo"].tokens
    results = run(core, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert all(r.error is None and r.finish_reason == "length" and len(r.tokens) == 4 for r in results.values())
    assert results["r5"].tokens == solo  # a slot reused many times still starts from a zero state
    assert core.scheduler.state_slots.num_free == 32 and not core.has_unfinished()


def test_speculative_decoding_is_refused_for_hybrids(tmp_path):
    import mlx_loom.kernels  # noqa: F401
    from mlx_loom.engine.core import EngineCore
    from mlx_loom.models.loader import load_model
    from mlx_loom.sched.config import EngineConfig, SpecConfig
    from tiny_archs import make_tiny_arch_dir

    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "mamba2", "mamba2")))
    with pytest.raises(ValueError, match="speculative decoding is not supported.*recurrent state"):
        EngineCore(EngineConfig(spec=SpecConfig(method="mxfp4")), loaded)


def test_a_failing_hybrid_row_fails_alone_and_leaves_the_others_states_as_they_were(tmp_path):
    """The failing call comes after another row's call in the same step: states are written only once
    every call is built, so the other row's retry resumes from its unadvanced state."""
    import mlx_loom.kernels  # noqa: F401
    from engine_driver import make_core, run
    from mlx_loom.models.loader import load_model
    from tiny_archs import make_tiny_arch_dir

    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "qwen3_5", "qwen3_5")))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = [30 + i for i in range(9)]
    expected = run(make_core(loaded), [("r0", prompt, params)])["r0"].tokens
    core = make_core(loaded)
    call = core.runner.generic._call

    def failing(rows, index, *args):
        if any(rows[i].request_id == "bad" for i in index):
            raise IndexError("injected failure")
        return call(rows, index, *args)

    core.runner.generic._call = failing
    got = run(core, [("r0", prompt, params), ("bad", [40, 41, 42], params)], join_step={"bad": 2})
    assert got["bad"].finish_reason == "error" and got["r0"].error is None
    assert got["r0"].tokens == expected


def test_a_row_whose_state_was_advanced_by_a_failed_step_fails_instead_of_running_on(tmp_path):
    import mlx_loom.kernels  # noqa: F401
    from engine_driver import make_core
    from mlx_loom.models.loader import load_model
    from mlx_loom.sched.scheduler import ScheduledRow
    from mlx_loom.worker.state_cache import StateOutOfStepError
    from tiny_archs import make_tiny_arch_dir

    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "mamba2", "mamba2")))
    runner = make_core(loaded).runner
    runner.execute([ScheduledRow("a", (5, 6, 7), 0, (0,), True, state_slot=0)])
    runner.execute([ScheduledRow("a", (8,), 3, (0,), True, state_slot=0)])  # the state holds 4 tokens now
    with pytest.raises(StateOutOfStepError, match="holds 4 tokens but the step resumes at 3"):
        runner.execute([ScheduledRow("a", (8,), 3, (0,), True, state_slot=0)])  # a retry of the same step


def test_warm_up_of_a_hybrid_leaves_nothing_a_request_resumes_from(tmp_path):
    import mlx_loom.kernels  # noqa: F401
    from engine_driver import make_core, run
    from mlx_loom.models.loader import load_model
    from tiny_archs import make_tiny_arch_dir

    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "lfm2", "lfm2")))
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    cold = run(make_core(loaded, max_num_seqs=8), [("a", [50, 51, 52, 53], params)])["a"].tokens
    core = make_core(loaded, max_num_seqs=8)
    assert core.warm_up().batch_sizes == (1, 2, 4, 8)
    assert run(core, [("a", [50, 51, 52, 53], params)])["a"].tokens == cold


def test_a_state_of_another_shape_than_the_slots_fails_the_step_instead_of_broadcasting():
    """A state that grows with the tokens seen (shaped by the two-token probe) would broadcast into the
    slots: commit refuses it, so the step fails and its rows fail alone."""
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx

    from mlx_loom.models.layout import LayerState
    from mlx_loom.sched.scheduler import ScheduledRow
    from mlx_loom.worker.state_cache import SlotStateCache, StateShapeError
    from mlx_loom.worker.state_pools import StatePools

    pools = StatePools([LayerState(((3,),), (mx.int32,))], num_slots=2)
    rows = [ScheduledRow(f"r{s}", (5,), 0, (0,), True, state_slot=s) for s in range(2)]
    cache = SlotStateCache(pools, 0, rows)
    cache[0] = mx.ones((2, 1), dtype=mx.int32)  # one token of context where the slots hold three
    with pytest.raises(StateShapeError, match=r"shape \(2, 1\) for 2 rows; its slots hold \(3,\)"):
        cache.commit()
    cache[0] = mx.ones((2, 3), dtype=mx.int32)
    cache.commit()
    assert pools.states[0][0].tolist() == [[1, 1, 1], [1, 1, 1]]
