"""The default model on the native 4-bit kernels gives the same greedy tokens as the float32 path."""

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
from mlx_loom.kernels import qmm  # noqa: E402
from mlx_loom.models.loader import load_model  # noqa: E402
from mlx_loom.sched.params import SamplingParams  # noqa: E402

from engine_driver import make_core, run  # noqa: E402

pytestmark = pytest.mark.skipif(not qmm.native_available(),
                                reason=f"native kernels not built: {qmm.native_unavailable_reason()}")


def test_default_model_keeps_4bit_weights_on_the_cpu(default_model):
    q_proj = default_model.model.layers[0].self_attn.q_proj
    assert q_proj.bits == 4 and q_proj.scales.dtype.size == 4  # float32 scales: the native contract
    assert default_model.model.model.embed_tokens.bits == 8  # Q8_0 token_embd, also the tied lm_head


def test_20_prompts_greedy_identical_to_float32_reference(default_model):
    from benchmarks._common import chat_prompts

    reference = load_model(None, dequantize=True)  # float32 weights through OpenBLAS
    prompts = chat_prompts(default_model.tokenizer, 20)
    requests = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=24)) for i, p in enumerate(prompts)]
    native = run(make_core(default_model), requests)
    expected = run(make_core(reference), requests)
    assert {r: native[r].tokens for r, _, _ in requests} == {r: expected[r].tokens for r, _, _ in requests}


def test_fused_decode_layer_matches_the_op_by_op_path(default_model):
    """Decode steps on the fused native layer (mlx_loom/kernels/decode_layer.py) vs the same engine running
    every layer as MLX ops: same greedy tokens with requests joining mid-batch and a small pool."""
    from benchmarks._common import chat_prompts

    prompts = chat_prompts(default_model.tokenizer, 8)
    requests = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=20)) for i, p in enumerate(prompts)]
    joins = {f"r{i}": 3 * i for i in range(8)}
    fused = make_core(default_model, num_blocks=48)
    assert fused.runner.fused_layers is not None
    op_by_op = make_core(default_model, num_blocks=48)
    op_by_op.runner.fused_layers = None
    got, want = run(fused, requests, joins), run(op_by_op, requests, joins)
    assert {r: got[r].tokens for r in got} == {r: want[r].tokens for r in want}
