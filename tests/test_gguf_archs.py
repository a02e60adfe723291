"""GGUF files of llama, qwen2, qwen3, qwen3moe, gemma2, gemma3 and phi3 (written in the session the way
llama.cpp converts them, tests/tiny_gguf.py) load into the matching mlx-lm model with the same logits
as the source weights, their tokenizer and chat template come from the metadata, and the engine
generates mlx-lm's tokens from them."""

from __future__ import annotations

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

from mlx_loom.kernels import qmm
from mlx_loom.models import gguf_arch
from mlx_loom.models.loader import load_model
from mlx_loom.models.layout import UnsupportedModelError
from test_architectures import _conformance
from tiny_archs import ARCHS, make_tiny_arch_dir
from tiny_gguf import write_gguf

Q8 = gguf.GGMLQuantizationType.Q8_0
PROMPT = mx.array([[5, 40, 77, 12, 200, 31, 9, 150, 64, 3, 99, 180]])


_LONGROPE = {"rope_scaling": {"type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(8)],
                              "short_factor": [1.0 + 0.1 * i for i in range(8)]},
             "max_position_embeddings": 1024, "original_max_position_embeddings": 64}
CASES = [  # (tiny_archs case, GGUF architecture, config overrides)
    ("llama", "llama", None),
    ("qwen2", "qwen2", None),
    ("qwen3", "qwen3", None),
    ("qwen3_moe", "qwen3moe", None),
    ("gemma2", "gemma2", None),
    # llama.cpp's own gemma3 layout (every 6th layer global, local RoPE base 10000), tied, with the linear
    # RoPE scaling of the global layers that Gemma 3 4B+ carry
    ("gemma3_text", "gemma3", {"sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    ("gemma3_text_untied", "gemma3", None),  # every 3rd layer global: an explicit per-layer pattern key
    ("phi3", "phi3", None),
    ("phi3", "phi3", _LONGROPE),  # LongRoPE factors as llama.cpp's rope_factors_{long,short} tensors
]


def _source(tmp_path, case, overrides=None):
    model, hf_tok = mlx_lm_load(str(make_tiny_arch_dir(tmp_path / case, case, overrides=overrides)))
    return model, hf_tok


def _f32(value):
    """Floats as GGUF stores them (float32), inside lists and dicts too."""
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, (list, tuple)):
        return [_f32(v) for v in value]
    if isinstance(value, dict):
        return {k: _f32(v) for k, v in value.items()}
    return value


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("case, arch, overrides", CASES,
                         ids=[f"{arch}-{case}" + ("-scaled" if o else "") for case, arch, o in CASES])
def test_gguf_loads_into_the_matching_mlx_lm_model(case, arch, overrides, tmp_path):
    source, hf_tok = _source(tmp_path, case, overrides)
    loaded = load_model(str(write_gguf(source, arch, tmp_path / f"{arch}.gguf")))
    assert loaded.model.model_type == ARCHS[case]["model_type"]
    assert _f32(vars(loaded.model.args)) == _f32(vars(source.args))  # every hyperparameter recovered from the metadata
    assert _rel(loaded.model(PROMPT), source(PROMPT)) < 1e-5
    text = "Hello, world's 12345 tokens!\n"
    assert loaded.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    _conformance(loaded, f"{arch} gguf ({case})")


@pytest.mark.parametrize("case, arch", [("qwen3", "qwen3"), ("qwen3_moe", "qwen3moe")])
@pytest.mark.parametrize("dequantize", [None, True], ids=["default", "dequantized"])
def test_q8_0_gguf_runs_on_the_engine(case, arch, dequantize, tmp_path):
    source, _ = _source(tmp_path, case)
    loaded = load_model(str(write_gguf(source, arch, tmp_path / "q8.gguf", q8=True)), dequantize=dequantize)
    quantized = type(loaded.model.layers[0].self_attn.q_proj).__name__.endswith("QuantizedLinear")
    assert quantized == (dequantize is None and mx.default_device() == mx.cpu and qmm.native_available()
                         or mx.default_device() != mx.cpu)
    # the source with its projections (experts too) rounded through Q8_0 as the file holds them: same logits
    rounded = [(n, mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(w), Q8), Q8)))
               for n, w in tree_flatten(source.parameters()) if w.ndim >= 2 and n.endswith("proj.weight")]
    source.load_weights(rounded, strict=False)
    assert _rel(loaded.model(PROMPT), source(PROMPT)) < 1e-5
    _conformance(loaded, f"{arch} q8_0 gguf")


def test_other_gguf_architectures_are_refused_by_name(tmp_path):
    source, _ = _source(tmp_path, "qwen3")
    path = write_gguf(source, "phi2", tmp_path / "x.gguf")  # general.architecture = phi2
    with pytest.raises(UnsupportedModelError, match="'phi2'.*llama, qwen2, qwen3, qwen3moe, gemma2, gemma3, phi3"):
        load_model(str(path))


@pytest.mark.parametrize("window, pattern, period", [
    (0, None, 1),  # no window: every layer global
    (8, None, 6),  # llama.cpp's default
    (8, 2, 2),
    (8, [True, True, False] * 2, 3),
    (8, [True, False, True, False], 2),
    (8, [True, False, False, True], None),  # not "every n-th layer global"
    (8, [True] * 4, None),  # no global layer
    (8, 0, None),  # llama.cpp: 0 = every layer slides
])
def test_gemma3_sliding_window_patterns(window, pattern, period):
    meta = {"gemma3.attention.sliding_window": window}
    if pattern is not None:
        meta["gemma3.attention.sliding_window_pattern"] = pattern
    m = lambda key, default=None: meta.get(f"gemma3.{key}", default)  # noqa: E731
    if period is None:
        with pytest.raises(UnsupportedModelError, match="sliding-window pattern"):
            gguf_arch._swa_period(m)
    else:
        assert gguf_arch._swa_period(m) == period


def test_phi3_yarn_factors_are_refused(tmp_path):
    """llama.cpp writes YaRN-scaled phi3 like LongRoPE but with another attention factor mlx-lm cannot take."""
    source, _ = _source(tmp_path, "phi3", _LONGROPE)
    path = write_gguf(source, "phi3", tmp_path / "yarn.gguf", edit=lambda w: w.add_rope_scaling_attn_factors(1.5))
    with pytest.raises(UnsupportedModelError, match="phi3 GGUF with RoPE attention factor 1.5"):
        load_model(str(path))


def test_q8_0_qwen2_gguf_keeps_its_qkv_biases_when_dequantized(tmp_path):
    """qwen2's q/k/v projections carry biases: the dequantizing load (MLX_LOOM_NATIVE=0, or no
    compiler) must keep them next to the dequantized weights."""
    source, _ = _source(tmp_path, "qwen2")
    loaded = load_model(str(write_gguf(source, "qwen2", tmp_path / "q8.gguf", q8=True)), dequantize=True)
    assert "bias" in loaded.model.layers[0].self_attn.q_proj
    rounded = [(n, mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(w), Q8), Q8)))
               for n, w in tree_flatten(source.parameters()) if w.ndim >= 2 and n.endswith("proj.weight")]
    source.load_weights(rounded, strict=False)
    assert _rel(loaded.model(PROMPT), source(PROMPT)) < 1e-5
    _conformance(loaded, "qwen2 q8_0 gguf, dequantized")


_NATIVE_OFF = """
import sys
sys.path.insert(0, {tests!r})
import mlx_loom.kernels  # OpenBLAS before mlx
import mlx.core as mx
from engine_driver import make_core, run
from mlx_loom.kernels import qmm
from mlx_loom.models.loader import load_model
from mlx_loom.sched.params import SamplingParams
assert not qmm.native_available()
loaded = load_model({path!r})
prompt = {prompt!r}
out = run(make_core(loaded, max_num_seqs=2, budget=32), [("r", prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))])
print("TOKENS", out["r"].tokens)
"""


def test_q8_0_qwen2_gguf_loads_and_matches_mlx_lm_with_native_kernels_off(tmp_path):
    """MLX_LOOM_NATIVE=0 (read at import, so in a fresh process): the GGUF is dequantized at load and
    its greedy tokens are mlx-lm's on the source weights rounded as the file holds them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlx_lm.generate import generate_step

    source, _ = _source(tmp_path, "qwen2")
    path = write_gguf(source, "qwen2", tmp_path / "q8.gguf", q8=True)
    rounded = [(n, mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(w), Q8), Q8)))
               for n, w in tree_flatten(source.parameters()) if w.ndim >= 2 and n.endswith("proj.weight")]
    source.load_weights(rounded, strict=False)
    prompt = PROMPT[0].tolist()
    expect = [int(t) for t, _ in generate_step(mx.array(prompt), source, max_tokens=8, sampler=lambda x: x.argmax(-1))]
    code = _NATIVE_OFF.format(tests=str(Path(__file__).parent), path=str(path), prompt=prompt)
    env = {**os.environ, "MLX_LOOM_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"TOKENS {expect}" in proc.stdout
