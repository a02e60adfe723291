"""Asynchronous decode steps (mlx_loom/engine/pipeline.py): the next step is launched before the
previous step's tokens are read. Same tokens as synchronous steps, nothing emitted past a stop,
every KV block freed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine_driver import chat_ids, run
from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig
from mlx_loom.engine.core import EngineCore
from mlx_loom.engine.messages import AddRequest
from mlx_loom.sched.params import SamplingParams
from mlx_loom.engine.pipeline import PLACEHOLDER, next_decode_step, rows_sample_on_device
from mlx_loom.sched.request import Request
from mlx_loom.sched.scheduler import Scheduler

GREEDY = SamplingParams(temperature=0, max_tokens=12)
TEXTS = ["What is the capital of France?", "Name three colors.", "Say hello in Spanish.", "What is 2 + 2?",
         "Write a haiku about the sea.", "List the days of the week."]


# -- pure scheduler ---------------------------------------------------------------------------

def _decoding(n: int = 2, max_tokens: int = 8) -> Scheduler:
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64),
                  CacheConfig(block_size=4), 32)
    for i in range(n):
        s.add_request(Request(f"r{i}", [10 + i, 11, 12], SamplingParams(temperature=0, max_tokens=max_tokens)))
    out = s.schedule()
    s.update_from_output(out, {r.request_id: [5] for r in out.rows})
    return s


def test_next_step_is_each_row_one_position_further_with_its_slots():
    s = _decoding()
    launched = s.schedule()  # decode rows at position 3
    after = next_decode_step(s, launched)
    assert [(r.request_id, r.start_pos, r.token_ids) for r in after.rows] == [("r0", 4, PLACEHOLDER), ("r1", 4, PLACEHOLDER)]
    assert all(len(r.block_ids) == 2 for r in after.rows)  # positions 0..4 over blocks of 4


def test_no_next_step_when_it_depends_on_the_tokens():
    s = _decoding()
    launched = s.schedule()
    s.add_request(Request("new", [1, 2], SamplingParams(temperature=0)))
    assert next_decode_step(s, launched) is None  # someone waits: the scheduler must admit
    s = _decoding(max_tokens=2)  # the launched step appends the last allowed token
    assert next_decode_step(s, s.schedule()) is None
    s = _decoding()
    out = s.schedule()
    assert rows_sample_on_device(out, s.requests)
    prefill = replace(out, rows=(replace(out.rows[0], token_ids=(1, 2)), *out.rows[1:]))
    assert not rows_sample_on_device(prefill, s.requests)  # only decode rows are launched ahead
    s = _decoding()
    launched = s.schedule()
    s.abort_request("r1")
    assert next_decode_step(s, launched) is None
    s = _decoding()
    launched = s.schedule()
    assert next_decode_step(s, replace(launched, rows=launched.rows[:1])) is None


# -- engine -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prompts(default_model):
    return [chat_ids(default_model.tokenizer, t) for t in TEXTS]


def _core(loaded, pipelined: bool, num_blocks: int = 256) -> EngineCore:
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                       scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256),
                       async_decode=pipelined)
    return EngineCore(cfg, loaded)


def _both(loaded, reqs, **kw):
    sync_core, async_core = _core(loaded, False), _core(loaded, True)
    sync = run(sync_core, reqs, **kw)
    got = run(async_core, reqs, **kw)
    return sync, got, async_core


def test_same_tokens_batched_and_staggered(default_model, prompts):
    reqs = [(f"r{i}", p, replace(GREEDY, max_tokens=6 + 3 * i)) for i, p in enumerate(prompts)]
    sync, got, core = _both(default_model, reqs, join_step={f"r{i}": 2 * i for i in range(len(reqs))})
    assert {r: (g.tokens, g.finish_reason) for r, g in got.items()} == {r: (g.tokens, g.finish_reason)
                                                                       for r, g in sync.items()}
    assert core.pipelined_steps > 10
    assert core.scheduler.num_free_blocks == core.scheduler.num_blocks and not core.has_unfinished()


def test_stops_are_seen_one_step_late_and_nothing_past_them_is_emitted(default_model, prompts):
    first = run(_core(default_model, False), [("eos", prompts[0], replace(GREEDY, max_tokens=60))])["eos"]
    assert first.finish_reason == "stop"  # the answer ends on EOS
    reqs = [("eos", prompts[0], replace(GREEDY, max_tokens=60)),
            ("stop_id", prompts[0], replace(GREEDY, max_tokens=60, stop_token_ids=(first.tokens[3],))),
            *[(f"len{n}", prompts[1], replace(GREEDY, max_tokens=n)) for n in (1, 2, 3, 5)]]
    sync, got, core = _both(default_model, reqs)
    assert {r: (g.tokens, g.finish_reason) for r, g in got.items()} == {r: (g.tokens, g.finish_reason)
                                                                       for r, g in sync.items()}
    assert got["stop_id"].tokens == first.tokens[:3] and got["eos"].tokens == first.tokens
    assert all(len(got[f"len{n}"].tokens) == n for n in (1, 2, 3, 5))
    assert core.pipelined_steps > 0 and core.scheduler.num_free_blocks == core.scheduler.num_blocks


def test_abort_while_a_step_is_in_flight_frees_everything(default_model, prompts):
    core = _core(default_model, True)
    for i in range(3):
        core.add(AddRequest(f"a{i}", tuple(prompts[i]), replace(GREEDY, max_tokens=30)))
    tokens = {f"a{i}": [] for i in range(3)}
    for _ in range(6):
        for out in core.step():
            tokens[out.request_id].extend(out.new_token_ids)
    assert core._inflight is not None
    core.abort("a1")
    while core.has_unfinished():
        for out in core.step():
            assert out.request_id != "a1" or out.finish_reason == "abort"
            tokens[out.request_id].extend(out.new_token_ids)
    want = run(_core(default_model, False), [(f"a{i}", prompts[i], replace(GREEDY, max_tokens=30)) for i in (0, 2)])
    assert tokens["a0"] == want["a0"].tokens and tokens["a2"] == want["a2"].tokens
    assert core.scheduler.num_free_blocks == core.scheduler.num_blocks


SAMPLED = SamplingParams(temperature=0.7, seed=7, max_tokens=16, ignore_eos=True)
"""What chat clients send: a temperature and a seed."""


def _same(sync, got) -> None:
    assert {r: (g.tokens, g.finish_reason) for r, g in got.items()} == {r: (g.tokens, g.finish_reason)
                                                                       for r, g in sync.items()}


def test_sampled_request_alone_is_pipelined_with_the_same_seeded_tokens(default_model, prompts):
    sync, got, core = _both(default_model, [("s", prompts[0], SAMPLED)])
    _same(sync, got)
    assert core.pipelined_steps >= 14 and core.scheduler.num_free_blocks == core.scheduler.num_blocks


def test_sampled_rows_batched_and_staggered_keep_their_seeded_tokens(default_model, prompts):
    kinds = [SAMPLED, replace(SAMPLED, top_p=0.9, seed=3), replace(SAMPLED, top_k=20, min_p=0.05, seed=None),
             GREEDY, replace(SAMPLED, temperature=1.2, top_p=0.95, top_k=50, seed=5), replace(SAMPLED, seed=8)]
    reqs = [(f"r{i}", p, replace(k, seed=k.seed if k.seed is not None else 100 + i))
            for i, (p, k) in enumerate(zip(prompts, kinds))]
    sync, got, core = _both(default_model, reqs, join_step={f"r{i}": 3 * i for i in range(len(reqs))})
    _same(sync, got)
    alone = run(_core(default_model, True), [reqs[2]])
    assert alone["r2"].tokens == got["r2"].tokens  # a seeded row: the same alone as in any batch
    assert core.pipelined_steps > 20


PROCESSED = [
    dict(presence_penalty=0.8, frequency_penalty=0.5),
    dict(repetition_penalty=1.3),
    dict(logit_bias=((28, 6.0), (13, -100.0), (10_000_000, 5.0))),
    dict(logprobs=True, top_logprobs=5),
    dict(temperature=0.0, frequency_penalty=1.5, logprobs=True),
]


@pytest.mark.parametrize("extra", PROCESSED, ids=lambda d: ",".join(d))
def test_penalties_bias_and_logprobs_are_pipelined_with_the_same_results(default_model, prompts, extra):
    reqs = [("p", prompts[1], replace(SAMPLED, **extra)), ("q", prompts[3], replace(SAMPLED, seed=9, **extra)),
            ("plain", prompts[4], SAMPLED)]
    sync, got, core = _both(default_model, reqs, join_step={"q": 4})
    _same(sync, got)
    for rid in ("p", "q"):
        assert [(lp.token_id, lp.logprob, lp.top) for lp in got[rid].logprobs] == \
               [(lp.token_id, lp.logprob, lp.top) for lp in sync[rid].logprobs]
        assert len(got[rid].logprobs) == (16 if "logprobs" in extra else 0)
    assert core.pipelined_steps > 10


def test_a_redrawn_wide_nucleus_drops_the_step_launched_from_it(default_model, prompts):
    """A flat distribution (temperature 3, top_p 0.99): the nucleus outgrows the candidates, the
    token is redrawn after the sync, and the step launched from the first draw is dropped."""
    wide = replace(SAMPLED, temperature=3.0, top_p=0.99, max_tokens=8)
    reqs = [("w", prompts[0], wide), ("s", prompts[2], SAMPLED)]
    sync, got, core = _both(default_model, reqs)
    _same(sync, got)
    assert core.dropped_steps > 0 and core.scheduler.num_free_blocks == core.scheduler.num_blocks


def test_grammar_rows_are_pipelined_with_masks_filled_while_the_forward_runs(default_model, prompts):
    """Grammar rows beside free ones: the forward is launched ahead, the masks follow the read; same
    tokens as synchronous steps, documents complete (a finished row drops the forward launched for it)."""
    from mlx_loom.schemas.grammar import GrammarSpec
    from structured_schemas import PERSON

    sync_core, async_core = _core(default_model, False), _core(default_model, True)
    backend = async_core.info.grammar
    person = backend.compile(GrammarSpec.json_schema(PERSON))
    reqs = [("g_sampled", prompts[0], replace(SAMPLED, max_tokens=64, ignore_eos=False, grammar=person)),
            ("g_greedy", prompts[1], replace(GREEDY, max_tokens=64, grammar=backend.compile(GrammarSpec.json_object()))),
            ("free", prompts[2], replace(SAMPLED, max_tokens=40))]
    sync = run(sync_core, reqs, join_step={"free": 2})
    got = run(async_core, reqs, join_step={"free": 2})
    _same(sync, got)
    assert got["g_sampled"].finish_reason in ("stop", "length") and got["free"].tokens
    assert async_core.pipelined_steps > 10
    assert async_core.scheduler.num_free_blocks == async_core.scheduler.num_blocks
