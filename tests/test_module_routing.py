"""The loader's class switches (quantized layers, RMSNorm, RoPE, gated SiLU MLPs) change no output:
a routed model gives the logits of mlx-lm's own load of the same checkpoint, and an MLP is
switched only when its own call computes down(silu(gate(x)) * up(x))."""

from __future__ import annotations

from pathlib import Path

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load

from mlx_loom.kernels import qmm
from mlx_loom.kernels.activations import route_gated_mlps, unrouted_type
from mlx_loom.kernels.rope_norm import NativeRMSNorm, NativeRoPE
from mlx_loom.models.loader import load_model
from tiny_archs import make_tiny_arch_dir

needs_native = pytest.mark.skipif(not qmm.native_available(), reason="native kernels not built")


class SiluMLP(nn.Module):
    def __init__(self, dim: int = 24, hidden: int = 40, act=nn.silu) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act = act

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(SiluMLP):
    def __init__(self) -> None:
        super().__init__(act=nn.gelu_approx)


class ScaledMLP(SiluMLP):
    def __call__(self, x: mx.array) -> mx.array:
        return 2.0 * super().__call__(x)


class BiasedMLP(SiluMLP):
    def __init__(self) -> None:
        super().__init__()
        self.bias = mx.zeros((24,))

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) + self.bias


@needs_native
def test_only_mlps_computing_silu_gating_are_switched():
    model = nn.Module()
    model.layers = [SiluMLP(), GeluMLP(), ScaledMLP(), BiasedMLP()]
    x = mx.random.normal((2, 5, 24), key=mx.random.key(3))
    before = [layer(x) for layer in model.layers]
    assert route_gated_mlps(model) == 1
    assert type(model.layers[0]) is not SiluMLP and unrouted_type(model.layers[0]) is SiluMLP
    assert [type(m) for m in model.layers[1:]] == [GeluMLP, ScaledMLP, BiasedMLP]  # probe said no / other keys
    for layer, expect in zip(model.layers, before):
        np.testing.assert_allclose(np.array(layer(x)), np.array(expect), rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("case,bits", [("qwen3", None), ("llama", None), ("gemma3_text", None), ("qwen3", 4)])
def test_routed_model_matches_mlx_lms_own_load(case, bits, tmp_path):
    path = make_tiny_arch_dir(tmp_path / case, case, bits=bits)
    ours = load_model(str(path)).model
    theirs, _ = mlx_lm_load(Path(path))
    routed = {type(m).__name__ for _, m in ours.named_modules()}
    assert not {type(m).__name__ for _, m in theirs.named_modules()} & {"NativeRoPE", "NativeRMSNorm", "NativeGatedMLP"}
    if case != "gemma3_text":  # gemma: its own norm class, GELU MLP: nothing of these switched
        assert {"NativeRoPE", "NativeRMSNorm", "NativeGatedMLP"} <= routed
    else:
        assert "NativeGatedMLP" not in routed
    tokens = mx.array([[3 + (11 * i) % 200 for i in range(40)]], dtype=mx.int32)
    expect = theirs(tokens)
    # 4-bit: our loader keeps the packed weights on the native kernel, mlx-lm's on mx.quantized_matmul
    tol = 1e-4 if bits else 2e-5
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(expect), rtol=tol, atol=tol * float(mx.abs(expect).max()))


def test_routing_leaves_no_trace_in_parameters(tmp_path):
    path = make_tiny_arch_dir(tmp_path / "qwen3", "qwen3")
    ours = load_model(str(path)).model
    theirs, _ = mlx_lm_load(Path(path))
    from mlx.utils import tree_flatten

    assert [k for k, _ in tree_flatten(ours.parameters())] == [k for k, _ in tree_flatten(theirs.parameters())]
    assert any(isinstance(m, (NativeRoPE, NativeRMSNorm)) for _, m in ours.named_modules())


@needs_native
def test_half_precision_mlps_keep_their_own_call():
    model = nn.Module()
    model.layers = [SiluMLP()]
    model.set_dtype(mx.bfloat16)
    assert route_gated_mlps(model) == 0 and type(model.layers[0]) is SiluMLP


def test_unroute_gives_every_module_its_own_class_back(tmp_path):
    from mlx_loom.models.routing import unroute_model

    path = make_tiny_arch_dir(tmp_path / "qwen3", "qwen3", bits=4)
    ours = load_model(str(path)).model
    theirs, _ = mlx_lm_load(Path(path))
    assert unroute_model(ours) > 0
    assert [type(m) for _, m in ours.named_modules()] == [type(m) for _, m in theirs.named_modules()]
