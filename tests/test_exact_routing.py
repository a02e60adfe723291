"""Routing is exact by construction: Step-3.5's MLPs clamp their activations (swiglu limits), so
they must keep their own code. With weights scaled so the clamp is reached, our engine gives the
tokens of mlx-lm's own load of the checkpoint (not of our routed model), and a module forced onto
the native SiLU class (what a probe-based switch did) is caught by the load-time self-check."""

from __future__ import annotations

from pathlib import Path

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import step3p5
from mlx_lm.utils import load_model as mlx_lm_load

from engine_driver import make_core, run
from mlx_loom.kernels import qmm
from mlx_loom.kernels.activations import routed_class
from mlx_loom.kernels.route_check import own_classes
from mlx_loom.models.loader import load_model
from mlx_loom.sched.params import SamplingParams
from mlx_loom.worker.runner import ModelRunner
from mlx_loom.worker.self_check import ModelCheckError, check_engine_matches_model
from tiny_archs import make_tiny_arch_dir

NORM_GAIN = 8.0  # on the norm before each MLP: its activations go well past the clamp at 10


def _clamping_step3p5(path: Path) -> Path:
    """A tiny step3p5 checkpoint whose MLP activations reach the swiglu clamp in the model, as in the
    released checkpoint: through the norm before the MLP, which a unit-scale probe of the MLP alone
    does not see (the probe-based switch dropped the clamp there)."""
    make_tiny_arch_dir(path, "step3p5")
    weights = mx.load(str(path / "model.safetensors"))
    for k in weights:
        if "post_attention_layernorm" in k:
            weights[k] = weights[k] * NORM_GAIN
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def _clamp_reached(model, prompt: list[int]) -> bool:
    """The first layer's MLP input, on the prompt, drives its gate past the limit."""
    layer = model.model.layers[0]
    h = model.model.embed_tokens(mx.array([prompt]))
    h = h + layer.self_attn(layer.input_layernorm(h), mask="causal")
    gate = layer.mlp.gate_proj(layer.post_attention_layernorm(h))
    return mx.abs(gate).max().item() > layer.mlp.limit


def _mlx_lm_tokens(path: Path, prompt: list[int], n: int) -> list[int]:
    model, _ = mlx_lm_load(path)  # mlx-lm's own load: its own classes, nothing routed
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: x.argmax(-1))]


def test_step3p5_clamped_mlps_give_mlx_lms_tokens(tmp_path):
    path = _clamping_step3p5(tmp_path / "step3p5")
    loaded = load_model(str(path))
    kinds = {type(m) for _, m in loaded.model.named_modules() if "Step3p5MLP" in type(m).__name__}
    assert kinds == {step3p5.Step3p5MLP}  # never switched to the native SiLU MLP
    prompts = [[3 + (17 * i + 5 * s) % 250 for i in range(n)] for s, n in enumerate((21, 30))]
    assert _clamp_reached(loaded.model, prompts[0])
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = run(make_core(loaded, max_num_seqs=4, budget=16), [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert got[f"r{i}"].error is None
        assert got[f"r{i}"].tokens == _mlx_lm_tokens(path, p, 16), f"prompt {i}: tokens differ from mlx-lm's"


@pytest.mark.skipif(not qmm.native_available(), reason="native kernels not built")
def test_self_check_catches_a_mis_routed_module(tmp_path):
    """Its reference is the model in its own classes, so the routed (clamp-dropping) MLP is seen."""
    loaded = load_model(str(_clamping_step3p5(tmp_path / "step3p5")))
    mlp = loaded.model.model.layers[0].mlp
    assert type(mlp) is step3p5.Step3p5MLP
    mlp.__class__ = routed_class(step3p5.Step3p5MLP)  # what the probe-based switch did
    with own_classes(loaded.model):
        assert type(mlp) is step3p5.Step3p5MLP
    assert type(mlp) is not step3p5.Step3p5MLP
    runner = ModelRunner(loaded.model, 16, 16, loaded.dtype)
    with pytest.raises(ModelCheckError, match="differ from the model's own"):
        check_engine_matches_model(runner, loaded.model, loaded.vocab_size, loaded.dtype)


@pytest.mark.skipif(not qmm.native_available(), reason="native kernels not built")
def test_engine_falls_back_to_the_models_own_modules_when_a_routed_one_differs(tmp_path, caplog):
    """The same mis-route at engine start: the self-check fails, the model's own modules pass it, and
    the engine serves them (reason logged) with mlx-lm's tokens."""
    path = _clamping_step3p5(tmp_path / "step3p5")
    loaded = load_model(str(path))
    loaded.model.model.layers[0].mlp.__class__ = routed_class(step3p5.Step3p5MLP)
    with caplog.at_level("WARNING", logger="mlx_loom.engine"):
        core = make_core(loaded, max_num_seqs=4, budget=16)
    assert "own modules" in caplog.text and core.runner.generic.rows_per_call is None
    assert type(loaded.model.model.layers[0].mlp) is step3p5.Step3p5MLP
    prompt = [3 + (17 * i) % 250 for i in range(21)]
    got = run(core, [("r", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))])["r"]
    assert got.tokens == _mlx_lm_tokens(path, prompt, 12)
