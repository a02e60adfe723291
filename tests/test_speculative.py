"""Speculative decoding inside the batch (issue 7): same greedy tokens as plain decoding, same
sampling distribution, grammar rows stay valid, the controller turns itself off on this CPU."""

from dataclasses import replace

import numpy as np
import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlx_loom.sched.config import CacheConfig, EngineConfig, SchedulerConfig, SpecConfig  # noqa: E402
from mlx_loom.engine.core import EngineCore  # noqa: E402
from mlx_loom.sched.params import SamplingParams  # noqa: E402

from engine_driver import chat_ids, run  # noqa: E402


def _core(loaded, spec: SpecConfig | None = None, num_blocks: int = 256, budget: int = 256,
          max_num_seqs: int = 16) -> EngineCore:
    cfg = EngineConfig(cache=CacheConfig(block_size=16, num_blocks=num_blocks),
                       scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget),
                       spec=spec or SpecConfig())
    return EngineCore(cfg, loaded)


TEXTS = ["What is the capital of France?", "Count from one to ten.", "Name three colors.",
         "Write a haiku about the sea.", "What is 2 + 2?", "List the days of the week.",
         "Say hello in Spanish.", "Repeat after me: the cat sat on the mat, the cat sat on the mat."]


@pytest.fixture(scope="module")
def prompts(default_model):
    return [chat_ids(default_model.tokenizer, t) for t in TEXTS]


@pytest.fixture(scope="module")
def plain(default_model, prompts):
    core = _core(default_model)
    reqs = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=16)) for i, p in enumerate(prompts)]
    return {rid: r.tokens for rid, r in run(core, reqs).items()}


@pytest.mark.parametrize("k,level2,batch", [(1, "none", 1), (2, "none", 4), (4, "none", 8), (4, "ngram", 8),
                                            (2, "ngram", 1)])
def test_greedy_tokens_identical_with_speculation(default_model, prompts, plain, k, level2, batch):
    core = _core(default_model, SpecConfig(method="mxfp4", k=k, level2=level2, mode="always"))
    reqs = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=16)) for i, p in enumerate(prompts[:batch])]
    got = run(core, reqs, join_step={f"r{i}": i for i in range(batch)})
    assert {rid: r.tokens for rid, r in got.items()} == {rid: plain[rid] for rid in got}
    stats = core.stats()
    assert stats.spec_num_drafts > 0 and stats.spec_proposed[0] > 0
    assert len(stats.spec_proposed) == (2 if level2 == "ngram" else 1)


def test_stop_eos_and_max_tokens_boundaries(default_model, prompts):
    """EOS inside a speculative run ends the request there; max_tokens cuts accepted drafts."""
    params = [SamplingParams(temperature=0, max_tokens=n) for n in (1, 2, 3, 5, 7, 20)]
    reqs = [(f"m{i}", prompts[i % len(prompts)], p) for i, p in enumerate(params)]
    eos = ("eos", prompts[0], SamplingParams(temperature=0, max_tokens=40))  # the answer ends on EOS
    first = run(_core(default_model), [eos])["eos"].tokens
    reqs += [eos, ("stop_id", prompts[0], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=(first[3],)))]
    base = run(_core(default_model), reqs)
    plain_tokens = {rid: (r.tokens, r.finish_reason) for rid, r in base.items()}
    spec = run(_core(default_model, SpecConfig(method="mxfp4", k=4, mode="always")), reqs)
    assert {rid: (r.tokens, r.finish_reason) for rid, r in spec.items()} == plain_tokens
    assert plain_tokens["eos"][1] == "stop" and plain_tokens["stop_id"][0] == first[:3]


def test_json_schema_rows_identical_and_valid(default_model, prompts):
    import json

    from mlx_loom.schemas.grammar import GrammarSpec

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    plain_core = _core(default_model)
    grammar = plain_core.info.grammar.compile(GrammarSpec.json_schema(schema))
    params = SamplingParams(temperature=0, max_tokens=40, grammar=grammar)
    reqs = [(f"j{i}", p, params) for i, p in enumerate(prompts[:3])]
    reqs.append(("free", prompts[3], SamplingParams(temperature=0, max_tokens=20)))
    want = run(plain_core, reqs)
    spec_core = _core(default_model, SpecConfig(method="mxfp4", k=4, level2="ngram", mode="always"))
    got = run(spec_core, reqs)
    assert {r: g.tokens for r, g in got.items()} == {r: w.tokens for r, w in want.items()}
    for rid in ("j0", "j1", "j2"):
        if got[rid].finish_reason == "stop":
            json.loads(default_model.tokenizer.decode(got[rid].tokens))
    assert spec_core.stats().spec_num_drafts > 0


def test_controller_turns_speculation_off_on_this_cpu(default_model, prompts):
    """auto mode measures draft and verify costs at start-up; on MLX's CPU backend a draft forward
    is not cheap enough, so no step speculates (throughput is recorded in benchmarks/)."""
    core = _core(default_model, SpecConfig(method="mxfp4", k=4, mode="auto"))
    costs = core.spec.controller.costs
    assert costs is not None and costs.draft(1) > 0 and costs.decode(1) > 0
    reqs = [(f"a{i}", p, SamplingParams(temperature=0, max_tokens=8)) for i, p in enumerate(prompts[:4])]
    run(core, reqs)
    if mx.default_device() == mx.cpu:
        assert core.stats().spec_num_drafts == 0
        assert core.spec.controller.last_speedup < core.spec.controller.min_speedup


def test_auto_mode_speculates_when_the_measured_costs_say_it_pays(monkeypatch):
    """auto mode with start-up costs injected in place of the measurement (a GPU-like table: a draft
    forward costs a tenth of a decode step, verification tokens nearly free): the controller turns
    speculation on, and the greedy tokens are those of plain decoding. A tiny random-weight target,
    drafted by its own real MXFP4 cast (which disagrees with it now and then)."""
    import mlx_loom.spec.draft_scaling as draft_scaling
    import mlx_loom.spec.speculator as speculator
    from mlx_loom.spec.controller import LinearCost, SpecCosts

    target = _tiny(0, 6.0)
    monkeypatch.setattr(draft_scaling, "activation_scales", lambda model, tokenizer, alpha: None)  # _Tok has no text
    costs = SpecCosts(decode=LinearCost(0.010, 0.0001), verify=LinearCost(0.010, 0.0001),
                      draft=LinearCost(0.001, 0.00001))
    measured = []
    monkeypatch.setattr(speculator, "measure_costs",
                        lambda runner, drafter, k, block_size, repeats=5: measured.append(k) or costs)
    prompts = [[1, 2, 3, 4, 5], [3, 1, 4, 1, 5, 2, 6], [7, 7, 7], [5, 0, 2]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    reqs = [(f"t{i}", p, params) for i, p in enumerate(prompts)]
    want = run(_core(target), reqs)

    core = _core(target, SpecConfig(method="mxfp4", k=4, mode="auto"))
    ctl = core.spec.controller
    assert measured == [4] and ctl.costs is costs and not ctl.always
    usage, step = {}, core.step

    def recording_step():
        outs = step()
        usage.update({o.request_id: (o.spec_proposed, o.spec_accepted) for o in outs})
        return outs

    monkeypatch.setattr(core, "step", recording_step)
    got = run(core, reqs)
    assert {rid: r.tokens for rid, r in got.items()} == {rid: r.tokens for rid, r in want.items()}
    stats = core.stats()
    assert stats.spec_num_drafts > 0
    # The first decode step of every request speculates (prior acceptance 0.7 on these costs).
    assert all(usage[rid][0] > 0 for rid, _, _ in reqs)
    assert sum(p for p, _ in usage.values()) == stats.spec_proposed[0]
    assert sum(a for _, a in usage.values()) == stats.spec_accepted[0]
    # Both verdicts happened: accepted drafts, and rejected ones that the target replaced.
    assert 0 < stats.spec_accepted[0] < stats.spec_proposed[0]


def test_penalty_and_logprob_rows_are_not_speculated(default_model, prompts):
    core = _core(default_model, SpecConfig(method="mxfp4", k=4, mode="always"))
    reqs = [("pen", prompts[0], SamplingParams(temperature=0, max_tokens=8, presence_penalty=0.5)),
            ("lp", prompts[1], SamplingParams(temperature=0, max_tokens=8, logprobs=True))]
    got = run(core, reqs)
    assert core.stats().spec_num_drafts == 0
    assert len(got["lp"].logprobs) == len(got["lp"].tokens)


# -- distribution: exact target marginals on a tiny model with an unrelated draft --

V = 8  # tiny vocabulary, so exact marginals are enumerable and 4000 samples pin them down


class _Tok:
    eos_token_ids = ()


def _tiny(seed: int, scale: float):
    import mlx.nn as nn
    from mlx_lm.models import llama

    from mlx_loom.models.loader import LoadedModel

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=V,
                           tie_word_embeddings=False, max_position_embeddings=256)
    mx.random.seed(seed)
    model = llama.Model(args)
    model.lm_head.weight = model.lm_head.weight * scale  # peaky, seed-specific next-token distributions
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear) and p != "lm_head")
    mx.eval(model.parameters())
    return LoadedModel(model, _Tok(), "tiny", 2, 4, 2, 16, V, 256, mx.float32)


def _exact_marginals(loaded, prompt: list[int], steps: int = 3) -> list[np.ndarray]:
    """p(token at output position j) for j < steps, by enumerating every prefix (V^j of them)."""
    model = loaded.model
    marg = [np.zeros(V) for _ in range(steps)]
    frontier = [((), 1.0)]
    for j in range(steps):
        nxt = []
        for prefix, w in frontier:
            logits = model(mx.array([prompt + list(prefix)]))[0, -1].astype(mx.float32)
            p = np.array(mx.softmax(logits))
            p = p / p.sum()
            marg[j] += w * p
            nxt += [(prefix + (t,), w * p[t]) for t in range(V)]
        frontier = nxt
    return marg


def test_sampling_distribution_is_the_targets(monkeypatch):
    import mlx_loom.spec.draft_model as draft_model
    import mlx_loom.spec.draft_scaling as draft_scaling

    target = _tiny(0, 6.0)
    draft = _tiny(1, 6.0).model  # unrelated weights: q far from p, so only correct rejection sampling passes
    monkeypatch.setattr(draft_model, "build_draft_model", lambda model, kind, scales=None, head_bits=None: draft)
    monkeypatch.setattr(draft_scaling, "activation_scales", lambda model, tokenizer, alpha: None)  # _Tok has no text
    prompt = [1, 2, 3, 4, 5]
    exact = _exact_marginals(target, prompt)
    # The draft must disagree with the target, or accepting every draft would pass too.
    assert 0.5 * np.abs(_exact_marginals(_tiny(1, 6.0), prompt)[1] - exact[1]).sum() > 0.2
    n = 4000
    core = _core(target, SpecConfig(method="mxfp4", k=2, mode="always"), num_blocks=2048, budget=1024,
                 max_num_seqs=128)
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
    reqs = [(f"s{i}", prompt, replace(params, seed=i)) for i in range(n)]
    got = run(core, reqs)
    assert core.stats().spec_num_drafts > 0
    for j in range(3):
        counts = np.bincount([got[f"s{i}"].tokens[j] for i in range(n)], minlength=V) / n
        tv = 0.5 * np.abs(counts - exact[j]).sum()
        assert tv <= 0.03, (j, tv, counts, exact[j])


def test_rows_with_fewer_slots_draft_only_what_fits(default_model):
    """Regression (IndexError in build_step_batch): one propose call with k = the largest row's budget
    drafted every row to k, writing KV past the slots of rows allocated for fewer tokens."""
    from mlx_loom.spec.drafter import DraftItem, ModelDrafter, NgramLevel

    block = 4
    drafter = ModelDrafter(default_model.model, 64, block, default_model.dtype, sub=NgramLevel())
    seq = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7]  # n-gram proposals accepted or not, both rows
    items = []
    for i, limit in enumerate((6, 1, 2)):
        blocks = -(-(len(seq) + limit) // block)  # what Speculator.extend allocates: 1 + limit slots
        items.append(DraftItem(f"r{i}", seq, tuple(range(i * 16, i * 16 + blocks)), SamplingParams(temperature=0),
                               np.random.default_rng(i), max_draft=limit))
    drafts = drafter.propose(items, 6)
    assert [len(drafts[f"r{i}"].tokens) for i in range(3)] == [6, 1, 2]


def test_many_rows_at_high_acceptance_near_their_max_tokens(default_model, prompts):
    """N=8, rows ending at different max_tokens (different draft budgets in one step), n-gram
    sub-proposals on repetitive prompts: the tokens are the plain engine's."""
    texts = ["Repeat after me: one two three, one two three, one two three.",
             "Repeat after me: red green blue, red green blue, red green blue."]
    reps = [chat_ids(default_model.tokenizer, t) for t in texts]
    reqs = [(f"h{i}", reps[i % 2] if i % 3 else prompts[i], SamplingParams(temperature=0, max_tokens=3 + 2 * i))
            for i in range(8)]
    plain_tokens = {rid: r.tokens for rid, r in run(_core(default_model), reqs).items()}
    core = _core(default_model, SpecConfig(method="mxfp4", k=6, level2="ngram", mode="always"))
    got = run(core, reqs)
    assert {rid: r.tokens for rid, r in got.items()} == plain_tokens
    assert all(r.error is None for r in got.values())
    assert core.stats().spec_accepted[0] > 0


def test_greedy_tokens_identical_on_a_16_bit_target_with_native_fp4_drafts(tmp_path):
    """A float16 checkpoint stays 16-bit (native half kernels, fused decode layer) and its MXFP4 /
    NVFP4 self-drafts run on the native fp4 kernels, fused too: speculation is still lossless."""
    from tiny_model import make_tiny_llama_dir

    from mlx_loom.kernels import lowp
    from mlx_loom.models.loader import load_model

    d = make_tiny_llama_dir(tmp_path / "m")
    weights = mx.load(str(d / "model.safetensors"))
    mx.save_safetensors(str(d / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    loaded = load_model(str(d))
    ids = [[1, 5, 9, 20, 33], [7, 3, 3, 8], [40, 41, 42, 43, 44, 45]]
    reqs = [(f"h{i}", p, SamplingParams(temperature=0, max_tokens=12)) for i, p in enumerate(ids)]
    want = {rid: r.tokens for rid, r in run(_core(loaded), reqs).items()}
    for method in ("mxfp4", "nvfp4"):
        core = _core(loaded, SpecConfig(method=method, k=3, mode="always"))
        if lowp.half_weights_enabled():
            assert core.spec.drafter.runner.fused_layers is not None
            proj = core.spec.drafter.runner.model.model.layers[0].mlp.up_proj
            assert isinstance(proj, lowp.NativeFp4Linear)
        got = run(core, reqs)
        assert {rid: r.tokens for rid, r in got.items()} == want
        assert core.stats().spec_num_drafts > 0
        counts = core.spec.by_position["greedy"]
        assert counts.tried and counts.tried[0] == core.stats().spec_num_drafts


def test_position_counts_condition_on_the_drafts_before():
    from mlx_loom.spec.acceptance import PositionCounts

    c = PositionCounts()
    c.record(4, 4)  # all kept
    c.record(4, 1)  # first kept, second rejected: positions 2, 3 never tried
    c.record(2, 0)
    assert c.tried == [3, 2, 1, 1] and c.kept == [2, 1, 1, 1]
    assert c.rates() == [2 / 3, 0.5, 1.0, 1.0]
