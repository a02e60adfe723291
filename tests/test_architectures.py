"""Conformance: every tested mlx-lm architecture through our engine gives mlx-lm's own tokens.

Tiny random-weight checkpoints (tests/tiny_archs.py) are loaded by our loader; mlx-lm's
`generate_step` on the same model object is the reference. Greedy tokens must be identical and
the top-5 logprobs within 1e-4 (relative past |logprob| 1), for a request alone, in a batch with staggered joins and chunked
prefill, after a preemption, and on a prefix-cache hit. Hybrids (recurrent state in slots next to
the paged KV) run the same scenarios, their prefix hit resuming from a state snapshot; the cache
layouts the engine does not page (a CacheList of key caches beside an indexer's, ChunkedKVCache), and
models whose own mlx-lm code pages cannot reproduce (plamo3, afm7), are refused with the real reason.
"""

from __future__ import annotations

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.generate import generate_step

from engine_driver import make_core, run
from mlx_loom.models.loader import load_model
from mlx_lm.models.cache import ArraysCache, CacheList, ChunkedKVCache
from mlx_lm.utils import _get_classes

from mlx_loom.models.layout import (TESTED_ARCHITECTURES, TESTED_HYBRIDS, UnsupportedModelError, fresh_state_apart,
                                    model_layout)
from mlx_loom.sched.params import SamplingParams
from tiny_archs import ARCHS, HYBRIDS, make_tiny_arch_dir

CASES = sorted(ARCHS)
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
        # 1e-4, relative where |logprob| > 1: float32 sums over paged keys run in another order than
        # over mlx-lm's concatenated cache, and gemma's scaled embeddings amplify that to ~1.3e-4 at -3
        worst = max(_rel(a, b) for (_, a), (_, b) in zip(got.top, want))
        assert worst <= 1e-4, f"{label}: top-5 logprobs differ by {worst:.3g} (relative)"
        assert _same_ranking(got.top, want), f"{label}: top-5 ids differ: {got.top} vs {want}"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


def _same_ranking(got, want, tol: float = 1e-5) -> bool:
    """The same ids in the same order, except that ids whose logprobs tie (within tol) may swap,
    also across the fifth place."""
    logprob = dict(want)
    for k, (token, value) in enumerate(got):
        if token == want[k][0]:
            continue
        tie = logprob.get(token, want[-1][1])  # an id past the fifth must tie with the fifth
        if _rel(value, tie) > tol or _rel(value, want[k][1]) > tol:
            return False
    return True


def _conformance(loaded, label: str) -> None:
    prompts = _prompts(loaded.vocab_size)
    expected = [_reference(loaded.model, p) for p in prompts]
    reqs = [(f"r{i}", p, _params()) for i, p in enumerate(prompts)]
    core = make_core(loaded, max_num_seqs=4, budget=16)  # prompts of 21-37 tokens prefill in chunks of <= 16
    assert core.runner.generic is not None or loaded.model.model_type in ("llama", "mistral", "qwen3")
    alone = run(core, reqs[:1])
    _assert_matches(alone["r0"], expected[0], f"{label} alone")
    staggered = run(core, reqs, join_step={"r0": 0, "r1": 2, "r2": 5})  # r0 again: a prefix-cache hit
    assert (staggered["r0"].cached > 0) == core.scheduler.kv.enable_caching  # hybrids: off (no state snapshots)
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


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma3_text", "gemma4_text"])
@pytest.mark.parametrize("dequantize", [None, True], ids=["default", "dequantized"])  # default: native kernels
def test_4bit_architecture_matches_mlx_lm(case, dequantize, tmp_path):
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / case, case, bits=4)), dequantize=dequantize)
    _conformance(loaded, f"{case} 4-bit")


@pytest.mark.parametrize("case", ["qwen3_5", "nemotron_h"])
def test_4bit_hybrid_matches_mlx_lm(case, tmp_path):
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / case, case, bits=4)))
    _conformance(loaded, f"{case} 4-bit")


@pytest.mark.parametrize("case", ["qwen3_5", "recurrent_gemma"])
def test_hybrid_one_token_prompt_joins_running_decodes(case, tmp_path):
    """A one-token prompt starts from a zero state in the same call as decode rows that continue theirs
    (qwen3_5), or in a call of its own where the model's code treats no state otherwise than a zero one
    (recurrent_gemma), with rows still batched (not one row per call, the self-check's fallback)."""
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / case, case)))
    assert fresh_state_apart(loaded.model) == (case == "recurrent_gemma")
    prompts = [_prompts(loaded.vocab_size)[0], [42]]
    expected = [_reference(loaded.model, p) for p in prompts]
    core = make_core(loaded, max_num_seqs=4, budget=64)
    assert core.runner.path == "generic (model's own code)"
    results = run(core, [(f"r{i}", p, _params()) for i, p in enumerate(prompts)], join_step={"r0": 0, "r1": 3})
    for i in range(2):
        _assert_matches(results[f"r{i}"], expected[i], f"{case} r{i}")


@pytest.mark.parametrize("case", ["kimi_linear", "plamo2"])
def test_settings_read_from_the_models_own_fields(case, tmp_path):
    """plamo2 keeps its ModelArgs as `config` (not `args`); kimi_linear names its context length
    `model_max_length`: both are read, not replaced by the 4096 fallback."""
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / case, case)))
    config = ARCHS[case]
    assert loaded.max_model_len == config.get("model_max_length", 256) != 4096
    assert loaded.num_heads == 4 and loaded.vocab_size == 320


# Cache layouts the engine does not page, or whose mlx-lm code disagrees with itself: model config fields (tiny) ->
# the reason the refusal must name.
UNPAGED = {
    "deepseek_v32": ({"model_type": "deepseek_v32", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                      "moe_intermediate_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4,
                      "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2, "kv_lora_rank": 32,
                      "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
                      "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8, "vocab_size": 320},
                     "lightning indexer"),
    "llama4": ({"model_type": "llama4", "text_config": {
        "model_type": "llama4_text", "attention_bias": False, "attention_chunk_size": 8, "head_dim": 16,
        "hidden_size": 64, "interleave_moe_layer_step": 1, "intermediate_size": 64, "intermediate_size_mlp": 128,
        "max_position_embeddings": 256, "num_attention_heads": 4, "num_experts_per_tok": 1, "num_hidden_layers": 4,
        "num_key_value_heads": 2, "num_local_experts": 2, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "rope_theta": 10000.0, "use_qk_norm": True, "vocab_size": 320}}, "chunked attention"),
    "plamo3": ({"model_type": "plamo3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 320,
                "window_size": 8, "sliding_window_pattern": 2},
               "prefill lets a query see 9 keys where its decode sees 8"),
    "afm7": ({"model_type": "afm7", "vocab_size": 320, "hidden_dim": 64, "num_layers": 4, "num_kv_reuse_layers": 2,
              "num_heads": 4, "num_kv_heads": 2},
             "afm7's KV-reuse layers instead place their queries by the array's length"),
}


@pytest.mark.parametrize("case", sorted(UNPAGED))
def test_unpaged_cache_layouts_are_refused_with_the_reason(case):
    config, reason = UNPAGED[case]
    model_class, args_class = _get_classes(config)
    with pytest.raises(UnsupportedModelError, match=reason) as err:
        model_layout(model_class(args_class.from_dict(config)))
    assert case in str(err.value)


def test_other_cache_lists_are_refused_naming_their_members():
    """The engine splits a CacheList of state and KV caches (falcon_h1, baichuan_m1); any other mix is refused."""
    class Odd(nn.Module):
        model_type = "odd"

        def make_cache(self) -> list:
            return [CacheList(ArraysCache(1), ChunkedKVCache(8))]

    with pytest.raises(UnsupportedModelError, match="'odd' keeps a CacheList of ArraysCache, ChunkedKVCache"):
        model_layout(Odd())


def test_every_tested_architecture_is_in_the_matrix():
    assert set(TESTED_ARCHITECTURES) | set(TESTED_HYBRIDS) <= {ARCHS[c]["model_type"] for c in CASES}
    assert set(TESTED_HYBRIDS) == {ARCHS[c]["model_type"] for c in HYBRIDS}


def test_hybrid_pipelined_decode_matches_mlx_lm(tmp_path):
    """Greedy rows without logprobs decode pipelined (the next step launched on the device tokens): the
    state slots chain through the launched steps."""
    loaded = load_model(str(make_tiny_arch_dir(tmp_path / "nemotron_h", "nemotron_h")))
    prompts = _prompts(loaded.vocab_size)[:2]
    expected = [_reference(loaded.model, p)[0] for p in prompts]
    core = make_core(loaded, max_num_seqs=4, budget=64)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    results = run(core, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert core.pipelined_steps > 0
    assert [results[f"r{i}"].tokens for i in range(2)] == expected
