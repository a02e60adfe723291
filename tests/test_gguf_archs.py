"""GGUF files of llama, qwen2 and qwen3 (written in the session the way llama.cpp converts them)
load into the matching mlx-lm model with the same logits as the source weights, their tokenizer and
chat template come from the metadata, and the engine generates mlx-lm's tokens from them."""

from __future__ import annotations

import mlx_loom.scheduler  # noqa: F401  (OpenBLAS before mlx)
import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_lm_load

from mlx_loom.scheduler.model import load_model
from mlx_loom.scheduler.model_layout import UnsupportedModelError
from test_architectures import _conformance
from tiny_archs import make_tiny_arch_dir
from tiny_gguf import write_gguf

Q8 = gguf.GGMLQuantizationType.Q8_0
PROMPT = mx.array([[5, 40, 77, 12, 200, 31, 9, 150, 64, 3, 99, 180]])


def _source(tmp_path, case):
    model, hf_tok = mlx_lm_load(str(make_tiny_arch_dir(tmp_path / case, case)))
    return model, hf_tok


def _rel(a: mx.array, b: mx.array) -> float:
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_gguf_loads_into_the_matching_mlx_lm_model(case, tmp_path):
    source, hf_tok = _source(tmp_path, case)
    loaded = load_model(str(write_gguf(source, case, tmp_path / f"{case}.gguf")))
    assert loaded.model.model_type == case
    assert _rel(loaded.model(PROMPT), source(PROMPT)) < 1e-5
    text = "Hello, world's 12345 tokens!\n"
    assert loaded.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    _conformance(loaded, f"{case} gguf")


def test_q8_0_gguf_runs_on_the_engine(tmp_path):
    source, _ = _source(tmp_path, "qwen3")
    loaded = load_model(str(write_gguf(source, "qwen3", tmp_path / "q8.gguf", q8=True)))
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__.endswith("QuantizedLinear")
    # the source with its projections rounded through Q8_0 as the file holds them: same logits
    rounded = [(n, mx.array(gguf.quants.dequantize(gguf.quants.quantize(np.array(w), Q8), Q8)))
               for n, w in tree_flatten(source.parameters()) if w.ndim == 2 and n.endswith("proj.weight")]
    source.load_weights(rounded, strict=False)
    assert _rel(loaded.model(PROMPT), source(PROMPT)) < 1e-5
    _conformance(loaded, "qwen3 q8_0 gguf")


def test_other_gguf_architectures_are_refused_by_name(tmp_path):
    source, _ = _source(tmp_path, "qwen3")
    path = write_gguf(source, "phi2", tmp_path / "x.gguf")  # general.architecture = phi2
    with pytest.raises(UnsupportedModelError, match="'phi2'.*llama, qwen2, qwen3"):
        load_model(str(path))
