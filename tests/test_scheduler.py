"""Scheduler tests without a model: budgets, chunked prefill, preemption, prefix hits, stops."""

import pytest

from mlx_loom.sched.config import CacheConfig, SchedulerConfig
from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.request import Request, RequestStatus
from mlx_loom.sched.scheduler import Scheduler

EOS = 2


def make(num_blocks=16, budget=32, max_seqs=4, caching=True, max_len=128) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len),
                     CacheConfig(block_size=4, enable_prefix_caching=caching), num_blocks)


def req(rid, n_prompt, max_tokens=8, base=10, **kw) -> Request:
    return Request(rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=max_tokens, **kw),
                   eos_token_ids=frozenset({EOS}))


def step(s: Scheduler, token: int = 7):
    """One schedule + update where every sampling row draws `token`."""
    out = s.schedule()
    changed = s.update_from_output(out, {r.request_id: [token] for r in out.rows if r.sample})
    return out, changed


def test_prefill_then_decode_rows():
    s = make()
    s.add_request(req("a", 6))
    out, changed = step(s)
    (row,) = out.rows
    assert (row.token_ids, row.start_pos, row.block_ids, row.sample) == (tuple(range(10, 16)), 0, (0, 1), True)
    assert [r.request_id for r in changed] == ["a"]
    out, _ = step(s)
    (row,) = out.rows
    assert (row.token_ids, row.start_pos, row.block_ids) == ((7,), 6, (0, 1))
    assert out.num_batched_tokens == 1


def test_prefill_is_chunked_under_the_budget_and_decodes_go_first():
    s = make(budget=8)
    s.add_request(req("a", 2))
    step(s)  # a prefilled, has one output token
    s.add_request(req("b", 20, base=100))
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids), r.sample) for r in out.rows] == [("a", 1, True), ("b", 7, False)]
    out, _ = step(s)
    assert [(r.request_id, r.start_pos, len(r.token_ids)) for r in out.rows] == [("a", 3, 1), ("b", 7, 7)]
    out, changed = step(s)
    assert [(r.request_id, r.start_pos, len(r.token_ids), r.sample) for r in out.rows] == [
        ("a", 4, 1, True), ("b", 14, 6, True)]
    assert {r.request_id for r in changed} == {"a", "b"}


def test_max_num_seqs_caps_rows_and_fcfs_order():
    s = make(max_seqs=2)
    for rid in "abc":
        s.add_request(req(rid, 3))
    out, _ = step(s)
    assert [r.request_id for r in out.rows] == ["a", "b"]
    assert s.num_waiting == 1


def test_stop_token_finishes_without_being_appended_and_frees_blocks():
    s = make()
    a = req("a", 3)
    s.add_request(a)
    step(s, token=5)
    _, changed = step(s, token=EOS)
    assert changed == [a] and a.status == RequestStatus.FINISHED_STOPPED
    assert a.output_token_ids == [5] and a.finish_reason == "stop"
    assert s.num_free_blocks == 16 and not s.has_unfinished()


def test_ignore_eos_and_stop_token_ids():
    s = make()
    a = req("a", 3, ignore_eos=True, stop_token_ids=(9,))
    s.add_request(a)
    step(s, token=EOS)
    assert a.output_token_ids == [EOS] and not a.is_finished
    step(s, token=9)
    assert a.finish_reason == "stop" and a.output_token_ids == [EOS]


def test_max_tokens_finishes_with_length():
    s = make()
    a = req("a", 3, max_tokens=2)
    s.add_request(a)
    step(s)
    step(s)
    assert a.finish_reason == "length" and a.output_token_ids == [7, 7]


def test_max_model_len_finishes_with_length():
    s = make(max_len=6)
    a = req("a", 4, max_tokens=100)
    s.add_request(a)
    step(s)
    step(s)
    assert a.finish_reason == "length" and a.num_tokens == 6


@pytest.mark.parametrize("n_prompt,max_tokens,match", [(0, 4, "empty"), (128, 4, "context"), (40, 40, "block")])
def test_requests_that_can_never_run_are_rejected(n_prompt, max_tokens, match):
    s = make(num_blocks=16)
    with pytest.raises(ValueError, match=match):
        s.add_request(req("a", n_prompt, max_tokens=max_tokens))
    assert not s.has_unfinished()


def test_duplicate_request_id_rejected():
    s = make()
    s.add_request(req("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(req("a", 3))


def test_preemption_recomputes_the_latest_admitted_request():
    s = make(num_blocks=4, budget=32)
    a, b = req("a", 7, max_tokens=8), req("b", 7, max_tokens=8, base=50)
    s.add_request(a)
    s.add_request(b)
    step(s)  # a: 7 prompt -> blocks 0,1; b: blocks 2,3; each has 1 output token
    out, _ = step(s)  # position 7 fits block 1 / block 3
    assert out.preempted_ids == ()
    out, _ = step(s)  # position 8 needs a new block each: none free -> b preempted
    assert out.preempted_ids == ("b",)
    # b's blocks went back tail first, so its last block (3) is reused first.
    assert [r.request_id for r in out.rows] == ["a"] and out.rows[0].block_ids == (0, 1, 3)
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0 and b.output_token_ids == [7, 7]
    assert s.num_preemptions == 1 and list(s.waiting) == [b]
    # Recompute resumes from its tokens so far once a finishes.
    while not a.is_finished:
        step(s)
    out, _ = step(s)
    (row,) = out.rows
    assert row.request_id == "b" and row.token_ids[-2:] == (7, 7) and row.sample
    assert row.start_pos + len(row.token_ids) == b.num_tokens - 1  # step() already appended one


def test_a_lone_request_that_runs_out_preempts_itself_then_resumes():
    # Two requests share 3 blocks; the one admitted first keeps going.
    s = make(num_blocks=3, budget=32)
    a, b = req("a", 4, max_tokens=4), req("b", 4, max_tokens=4, base=60)
    s.add_request(a)
    s.add_request(b)
    for _ in range(10):
        if not s.has_unfinished():
            break
        step(s)
    assert a.finish_reason == "length" and b.finish_reason == "length"
    assert s.num_free_blocks == 3


def test_prefix_hit_on_admission_counts_tokens():
    s = make(num_blocks=16)
    a = req("a", 10, max_tokens=1)
    s.add_request(a)
    step(s)
    b = req("b", 11, max_tokens=1)  # same first 10 tokens
    s.add_request(b)
    out, _ = step(s)
    (row,) = out.rows
    assert row.start_pos == 8 and len(row.token_ids) == 3
    assert b.num_cached_tokens == 8
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (21, 8)


def test_abort_frees_blocks_of_running_and_waiting():
    s = make(max_seqs=1)
    a, b = req("a", 5), req("b", 5)
    s.add_request(a)
    s.add_request(b)
    step(s)
    assert s.abort_request("b") is b and b.finish_reason == "abort"
    assert s.abort_request("a") is a
    assert s.abort_request("a") is None
    assert s.num_free_blocks == 16 and not s.has_unfinished() and s.num_waiting == 0


def test_stop_after_finishes_with_the_token_appended():
    s = make()
    a = req("a", 3)
    s.add_request(a)
    out = s.schedule()
    s.update_from_output(out, {"a": [11]}, stop_after={"a"})
    assert a.finish_reason == "stop" and a.output_token_ids == [11]
    assert s.num_free_blocks == 16


def test_speculative_row_counts_only_accepted_drafts_as_computed():
    """A row with 3 drafts whose target accepted 1: computed = last token + 1 draft; two tokens appended."""
    from dataclasses import replace

    s = make()
    s.add_request(req("a", 5, max_tokens=10))
    step(s)  # prefill, first token
    out = s.schedule()
    r = s.requests["a"]
    assert r.num_computed_tokens == 5 and r.num_tokens == 6
    block_ids = s.kv.allocate_slots(r, 4)
    row = replace(out.rows[0], token_ids=out.rows[0].token_ids + (7, 8, 9), block_ids=block_ids, num_draft=3)
    s.update_from_output(replace(out, rows=(row,)), {"a": [7, 42]})
    assert r.output_token_ids[-2:] == [7, 42]
    assert r.num_computed_tokens == 7 and r.num_tokens == 8


def test_speculative_tokens_after_a_stop_token_are_dropped():
    from dataclasses import replace

    s = make()
    s.add_request(req("a", 5, max_tokens=10))
    step(s)
    out = s.schedule()
    block_ids = s.kv.allocate_slots(s.requests["a"], 3)
    row = replace(out.rows[0], token_ids=out.rows[0].token_ids + (7, EOS), block_ids=block_ids, num_draft=2)
    changed = s.update_from_output(replace(out, rows=(row,)), {"a": [7, EOS, 5]})
    assert changed[0].output_token_ids[-1] == 7 and changed[0].finish_reason == "stop"
    assert s.num_free_blocks == 16


def _make_capped(cap: int, budget: int = 32, num_blocks: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256,
                                     long_prefill_chunk=cap), CacheConfig(block_size=4), num_blocks)


def test_a_long_prompt_alone_takes_the_whole_budget():
    s = _make_capped(cap=8)
    s.add_request(req("long", 100))
    out, _ = step(s)
    assert [len(r.token_ids) for r in out.rows] == [32]


def test_a_short_request_behind_a_long_prompt_starts_at_the_next_step():
    """The starvation case: the long prompt took the budget every step until it finished."""
    s = _make_capped(cap=8)
    s.add_request(req("long", 100))
    step(s)  # alone: 32 tokens
    s.add_request(req("short", 5, base=200))
    out, changed = step(s)
    assert [(r.request_id, len(r.token_ids), r.sample) for r in out.rows] == [("long", 8, False), ("short", 5, True)]
    assert [r.request_id for r in changed] == ["short"]  # its first token, while the long prompt runs on
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids)) for r in out.rows] == [("long", 8), ("short", 1)]


def test_running_decodes_keep_their_budget_behind_several_long_prompts():
    s = _make_capped(cap=16, budget=32, num_blocks=256)  # no preemption
    for rid in ("l1", "l2", "l3"):
        s.add_request(req(rid, 120, base=10 + 200 * int(rid[1])))
    s.add_request(req("d", 3, base=900))
    started = None
    for i in range(12):
        out, _ = step(s)
        assert out.num_batched_tokens <= 32
        if "d" in s.requests and s.requests["d"].output_token_ids:
            started = i if started is None else started
            assert "d" in [r.request_id for r in out.rows]  # decoding every step once it started
    assert started is not None and started <= 2  # joined behind three long prompts within two steps


def test_no_cap_restores_whole_budget_chunks():
    s = _make_capped(cap=0)
    s.add_request(req("long", 100))
    step(s)
    s.add_request(req("short", 5, base=200))
    out, _ = step(s)
    assert [(r.request_id, len(r.token_ids)) for r in out.rows] == [("long", 32)]
