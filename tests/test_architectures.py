"""Conformance: every tested mlx-lm architecture through our engine gives mlx-lm's own tokens.

Tiny random-weight checkpoints (tests/tiny_archs.py) are loaded by our loader; mlx-lm's
`generate_step` on the same model object is the reference. Greedy tokens must be identical and
the top-5 logprobs within 1e-4 (relative past |logprob| 1), for a request alone, in a batch with staggered joins and chunked
prefill, after a preemption, and on a prefix-cache hit. Hybrids are refused by name.
"""

from __future__ import annotations

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from engine_driver import make_core, run
from mlx_loom.models.loader import load_model
from mlx_loom.models.layout import TESTED_ARCHITECTURES, UnsupportedModelError
from mlx_loom.sched.params import SamplingParams
from tiny_archs import ARCHS, HYBRIDS, make_tiny_arch_dir

CASES = sorted(c for c in ARCHS if c not in HYBRIDS)
MAX_TOKENS = 24
TOP = 5


def _prompts(vocab: int) -> list[list[int]]:
    """Three prompts of 21, 37 and 30 tokens (longer than the sliding windows of 8); ids past the specials."""
    return [[3 + (17 * i + 7 * s + 5) % (vocab - 70) for i in range(n)] for s, n in enumerate((21, 37, 30))]


def _reference(model, prompt: list[int]) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """mlx-lm's own greedy generation: tokens and the top-5 (id, logprob) at each."""
    tokens, tops = [], []
    for tok, logprobs in generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS, sampler=lambda x: x.argmax(-1)):
        order = mx.argsort(-logprobs)[:TOP].tolist()
        tokens.append(int(tok))
        tops.append([(i, logprobs[i].item()) for i in order])
    return tokens, tops


def _params() -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=TOP)


def _assert_matches(result, expected, label: str) -> None:
    tokens, tops = expected
    assert result.error is None, f"{label}: {result.error}"
    assert result.tokens == tokens, f"{label}: tokens differ from mlx-lm's"
    for got, want in zip(result.logprobs, tops):
        assert [t for t, _ in got.top] == [t for t, _ in want], f"{label}: top-5 ids differ"
        # 1e-4, relative where |logprob| > 1: float32 sums over paged keys run in another order than
        # over mlx-lm's concatenated cache, and gemma's scaled embeddings amplify that to ~1.3e-4 at -3
        worst = max(abs(a - b) / max(1.0, abs(b)) for (_, a), (_, b) in zip(got.top, want))
        assert worst <= 1e-4, f"{label}: top-5 logprobs differ by {worst:.3g} (relative)"


def _conformance(loaded, label: str) -> None:
    prompts = _prompts(loaded.vocab_size)
    expected = [_reference(loaded.model, p) for p in prompts]
    reqs = [(f"r{i}", p, _params()) for i, p in enumerate(prompts)]
    core = make_core(loaded, max_num_seqs=4, budget=16)  # prompts of 21-37 tokens prefill in chunks of <= 16
    assert core.runner.generic is not None or loaded.model.model_type in ("llama", "mistral", "qwen3")
    alone = run(core, reqs[:1])
    _assert_matches(alone["r0"], expected[0], f"{label} alone")
    staggered = run(core, reqs, join_step={"r0": 0, "r1": 2, "r2": 5})  # r0 again: a prefix-cache hit
    assert staggered["r0"].cached > 0
    for i, (rid, _, _) in enumerate(reqs):
        _assert_matches(staggered[rid], expected[i], f"{label} staggered {rid}")
    tight = make_core(loaded, num_blocks=9, max_num_seqs=4, budget=16, prefix_caching=False)  # 3 rows need 12 blocks at the end
    preempted = run(tight, reqs)
    assert tight.stats().num_preemptions > 0
    for i, (rid, _, _) in enumerate(reqs):
        _assert_matches(preempted[rid], expected[i], f"{label} preempted {rid}")


@pytest.mark.parametrize("case", CASES)
def test_architecture_matches_mlx_lm(case, tmp_path):
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / case, case)))
    _conformance(loaded, case)


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("dequantize", [None, True], ids=["default", "dequantized"])  # default: native kernels
def test_4bit_architecture_matches_mlx_lm(case, dequantize, tmp_path):
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / case, case, bits=4)), dequantize=dequantize)
    _conformance(loaded, f"{case} 4-bit")


@pytest.mark.parametrize("case", sorted(HYBRIDS))
def test_hybrid_architectures_are_refused_by_name(case, tmp_path):
    with pytest.raises(UnsupportedModelError, match=ARCHS[case]["model_type"]) as err:
        load_model(str(make_tiny_arch_dir(tmp_path / case, case)))
    assert "qwen3" in str(err.value)  # the message lists what is served


def test_every_tested_architecture_is_in_the_matrix():
    assert set(TESTED_ARCHITECTURES) <= {ARCHS[c]["model_type"] for c in CASES}
