"""Engine invariance on the real default model: batching, prefix cache, preemption, seeds."""

import pytest

from engine_driver import chat_ids, make_core, run
from mlx_loom.sched.params import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Write one sentence about cats.",
    "List three colors.",
    "Why is the sky blue? Answer briefly, in one or two sentences please.",
    "What is 2+2?",
    "Name a planet in the solar system and describe it in a sentence.",
    "Say hello in Spanish.",
    "Give me a tip for learning to play the guitar as an adult beginner with little time.",
]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


@pytest.fixture(scope="module")
def prompts(default_model):
    return [chat_ids(default_model.tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def alone(default_model, prompts):
    """Greedy output of each prompt run on its own engine."""
    out = {}
    for i, p in enumerate(prompts):
        core = make_core(default_model, prefix_caching=False)
        out[f"r{i}"] = run(core, [(f"r{i}", p, GREEDY)])[f"r{i}"].tokens
    return out


def test_default_model_answers_paris(default_model, prompts):
    core = make_core(default_model)
    res = run(core, [("q", prompts[0], GREEDY)])["q"]
    assert "Paris" in default_model.tokenizer.decode(res.tokens)


def test_batch_of_8_joining_at_different_steps_matches_alone(default_model, prompts, alone):
    core = make_core(default_model, prefix_caching=False)
    reqs = [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    joins = {f"r{i}": step for i, step in enumerate([0, 0, 1, 3, 3, 5, 8, 13])}
    res = run(core, reqs, joins)
    for rid, expected in alone.items():
        assert res[rid].tokens == expected, rid
    assert core.stats().num_blocks_free == core.stats().num_blocks_total


def test_chunked_prefill_under_small_budget_matches_alone(default_model, prompts, alone):
    core = make_core(default_model, budget=16, max_num_seqs=8, prefix_caching=False)
    res = run(core, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    for rid, expected in alone.items():
        assert res[rid].tokens == expected, rid


def test_prefix_cache_hit_gives_same_tokens(default_model, prompts, alone):
    core = make_core(default_model, prefix_caching=True)
    first = run(core, [("a", prompts[3], GREEDY)])["a"]
    second = run(core, [("b", prompts[3], GREEDY)])["b"]
    assert first.cached == 0 and second.cached >= 16
    assert first.tokens == second.tokens == alone["r3"]
    assert core.stats().prefix_cache_hits >= second.cached


def test_preemption_with_tiny_pool_matches_alone(default_model, prompts, alone):
    # 8 requests of ~40-60 tokens need ~32 blocks at once; 14 blocks forces recompute preemption.
    core = make_core(default_model, num_blocks=14, prefix_caching=False)
    res = run(core, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert core.stats().num_preemptions > 0
    for rid, expected in alone.items():
        assert res[rid].tokens == expected, rid
    assert core.stats().num_blocks_free == 14


def test_seeded_sampling_same_alone_and_batched(default_model, prompts):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    solo = run(make_core(default_model), [("s", prompts[1], params)])["s"].tokens
    others = [(f"o{i}", p, SamplingParams(max_tokens=12, temperature=1.0)) for i, p in enumerate(prompts[2:6])]
    batched = run(make_core(default_model), others + [("s", prompts[1], params)], {"s": 2})["s"].tokens
    assert solo == batched
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99)
    assert run(make_core(default_model), [("t", prompts[1], other_seed)])["t"].tokens != solo


def test_request_that_can_never_fit_gets_clear_error(default_model, prompts):
    core = make_core(default_model, num_blocks=5)
    res = run(core, [("big", prompts[0], SamplingParams(max_tokens=200))])["big"]
    assert res.finish_reason == "error" and "block" in res.error.lower()


def test_abort_frees_blocks(default_model, prompts):
    core = make_core(default_model)
    from mlx_loom.engine.messages import AddRequest

    core.add(AddRequest("x", tuple(prompts[7]), SamplingParams(max_tokens=50)))
    for _ in range(3):
        core.step()
    assert core.stats().num_blocks_free < core.stats().num_blocks_total
    out = core.abort("x")
    assert out.finish_reason == "abort"
    assert core.stats().num_blocks_free == core.stats().num_blocks_total
    assert not core.has_unfinished()


def test_stop_token_and_max_tokens(default_model, prompts):
    core = make_core(default_model)
    base = run(core, [("a", prompts[0], GREEDY)])["a"]
    assert base.finish_reason in ("stop", "length")
    stop_on = base.tokens[2]
    res = run(core, [("b", prompts[0], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop_on,)))])["b"]
    assert res.finish_reason == "stop" and res.tokens == base.tokens[: base.tokens.index(stop_on)]
    res = run(core, [("c", prompts[0], SamplingParams(max_tokens=3, temperature=0.0))])["c"]
    assert res.finish_reason == "length" and res.tokens == base.tokens[:3]


def test_logprobs_reported_per_token(default_model, prompts):
    core = make_core(default_model)
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3)
    res = run(core, [("l", prompts[0], params)])["l"]
    assert len(res.logprobs) == len(res.tokens)
    for lp, tok in zip(res.logprobs, res.tokens):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
