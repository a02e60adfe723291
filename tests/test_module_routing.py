"""The loader's class switches (quantized layers, RMSNorm, RoPE, gated SiLU MLPs) change no output:
a routed model gives the logits of mlx-lm's own load of the same checkpoint; an MLP is switched
only when its class is exactly one of mlx-lm's listed SiLU-gated MLPs (each checked against its own
call on large and edge-case inputs), and a mis-routed module is caught by the load-time check."""

from __future__ import annotations

from pathlib import Path

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama, step3p5
from mlx_lm.utils import load_model as mlx_lm_load

from mlx_loom.kernels import qmm
from mlx_loom.kernels.activations import KNOWN_SWIGLU_MLPS, route_gated_mlps, routed_class, unrouted_type
from mlx_loom.kernels.route_check import verify_routes
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


class ClampedLlamaMLP(llama.MLP):
    """A subclass adding behaviour (as step3p5's clamp): must keep its own call."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.clip(super().__call__(x), -1.0, 1.0)


def _bare(cls: type, dim: int = 32, hidden: int = 64, bits: int | None = None) -> nn.Module:
    """An instance of an mlx-lm MLP class with its three projections (constructors take model args)."""
    mlp = cls.__new__(cls)
    nn.Module.__init__(mlp)
    for name, (i, o) in {"gate_proj": (dim, hidden), "up_proj": (dim, hidden), "down_proj": (hidden, dim)}.items():
        proj = nn.Linear(i, o, bias=False)
        proj.weight = 2.0 * mx.random.normal((o, i), key=mx.random.key(i * o + len(name))) / i**0.5
        mlp[name] = nn.QuantizedLinear.from_linear(proj, 32, bits) if bits else proj
    mlp.limit = None  # step3p5's attribute: its Step3p5MLP computes plain swiglu when None
    return mlp


@needs_native
def test_only_listed_mlx_lm_classes_are_switched_never_by_a_probe():
    """A local class computing the same swiglu, a subclass of a listed class and step3p5's clamped
    MLP all keep their own call; only the listed mlx-lm class is switched."""
    model = nn.Module()
    model.layers = [_bare(llama.MLP), SiluMLP(), GeluMLP(), _bare(ClampedLlamaMLP), _bare(step3p5.Step3p5MLP)]
    assert route_gated_mlps(model) == 1
    assert unrouted_type(model.layers[0]) is llama.MLP and type(model.layers[0]) is not llama.MLP
    assert [type(m) for m in model.layers[1:]] == [SiluMLP, GeluMLP, ClampedLlamaMLP, step3p5.Step3p5MLP]


def _edge_inputs(dim: int) -> mx.array:
    """Rows at scales 0 to 1e4 and a row of extremes (huge either way, tiny, signed zeros)."""
    rows = mx.random.normal((6, dim), key=mx.random.key(5)) * mx.array([0.0, 1.0, 8.0, 64.0, 1024.0, 1e4])[:, None]
    edges = mx.array([[1e30, -1e30, 1e-30, -1e-30, 0.0, -0.0, 88.0, -88.0] * (dim // 8)], dtype=mx.float32)
    return mx.concatenate([rows, edges])[None]  # [1, 7, dim]


@needs_native
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("cls", sorted(KNOWN_SWIGLU_MLPS, key=lambda c: c.__module__), ids=lambda c: c.__module__)
def test_each_listed_mlp_class_routed_equals_its_own_call(cls, bits):
    mlp = _bare(cls, bits=bits)
    x = _edge_inputs(32)
    expect = mlp(x)
    model = nn.Module()
    model.layers = [mlp]
    assert route_gated_mlps(model) == 1 and type(mlp) is not cls
    got = mlp(x)
    assert bool(mx.array_equal(mx.isfinite(got), mx.isfinite(expect)))
    finite = mx.isfinite(expect)
    got, expect = mx.where(finite, got, 0.0), mx.where(finite, expect, 0.0)
    row_max = mx.maximum(mx.abs(expect).max(axis=-1, keepdims=True), 1e-30)
    assert (mx.abs(got - expect) / row_max).max().item() <= 1e-5


@needs_native
def test_a_mis_routed_module_gets_its_own_class_back_at_load(caplog):
    """step3p5's clamped MLP forced onto the native SiLU class (what the old probe did): the load-time
    route check, on inputs up to 4096, sees the dropped clamp and restores its own class, logged."""
    mlp = _bare(step3p5.Step3p5MLP)
    mlp.limit = 7.0
    model = nn.Module()
    model.layers = [mlp, _bare(llama.MLP)]
    route_gated_mlps(model)
    mlp.__class__ = routed_class(step3p5.Step3p5MLP)
    with caplog.at_level("WARNING", logger="mlx_loom.engine"):
        reasons = verify_routes(model)
    assert type(mlp) is step3p5.Step3p5MLP and unrouted_type(model.layers[1]) is llama.MLP
    assert type(model.layers[1]) is not llama.MLP  # a correct switch stays
    assert len(reasons) == 1 and "layers.0" in reasons[0] and "layers.0" in caplog.text


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
    model.layers = [_bare(llama.MLP)]
    model.set_dtype(mx.bfloat16)
    assert route_gated_mlps(model) == 0 and type(model.layers[0]) is llama.MLP


def test_unroute_gives_every_module_its_own_class_back(tmp_path):
    from mlx_loom.models.routing import unroute_model

    path = make_tiny_arch_dir(tmp_path / "qwen3", "qwen3", bits=4)
    ours = load_model(str(path)).model
    theirs, _ = mlx_lm_load(Path(path))
    assert unroute_model(ours) > 0
    assert [type(m) for _, m in ours.named_modules()] == [type(m) for _, m in theirs.named_modules()]
