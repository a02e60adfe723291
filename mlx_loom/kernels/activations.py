"""Gated MLP activation. Reference: mlx.nn.silu(gate) * up.

MLX's CPU exp and sigmoid cost ~20 ns per element (scalar libm). The native extension's SiluMul
primitive (mlx_loom/kernels/native/activation_tile.h: a vector exp2, all cores) runs it when built;
otherwise, on the CPU, silu is written as x / (1 + 2^(-x log2 e)), power(2, x) being ~3x cheaper
than exp there. A 512-token prefill of SmolLM2 spent ~0.25 s in this activation with MLX's ops.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels import lowp, qmm

_LOG2E = 1.4426950408889634


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, elementwise."""
    if mx.default_device() == mx.cpu:
        if qmm.native_available() and gate.dtype == up.dtype == mx.float32 and gate.shape == up.shape:
            return qmm.native_module().silu_mul(gate, up)
        return gate * up / (1.0 + mx.power(2.0, gate * -_LOG2E))
    return silu_mul_reference(gate, up)


def silu_mul_reference(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class _NativeGatedMLP:
    """Mixin for an mlx-lm MLP class whose call is down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


_ROUTED: dict[type, type] = {}
_GATED_KEYS = {"gate_proj", "up_proj", "down_proj"}


def unrouted_type(module: nn.Module) -> type:
    """The model's own class of `module` (route_gated_mlps switches instances to a subclass)."""
    return getattr(type(module), "_loom_base", type(module))


def route_gated_mlps(model: nn.Module) -> int:
    """Switch every MLP of `model` that holds exactly gate/up/down projections and computes
    down(silu(gate(x)) * up(x)) (checked on a probe input against its own call) to a subclass
    running silu_mul: mlx-lm's swiglu is an MLX CPU sigmoid at ~15 ns per value. Only where the
    native primitive runs (float32 on the CPU). Returns how many were switched."""
    if not qmm.native_on_cpu():
        return 0
    switched = 0
    for _, module in model.named_modules():
        if set(module.keys()) != _GATED_KEYS or not all(isinstance(module[k], nn.Module) for k in _GATED_KEYS):
            continue
        base = type(module)
        routed = _ROUTED.setdefault(base, type(f"NativeGated{base.__name__}", (_NativeGatedMLP, base),
                                               {"_loom_base": base}))
        if _same_on_probe(module, routed):
            switched += 1
    return switched


def _same_on_probe(module: nn.Module, routed: type) -> bool:
    """Switch module to `routed` if both calls agree on a random input; restore its class otherwise.
    Float32 projections only: silu_mul is the native primitive there (other dtypes would round
    differently from the model's own activation)."""
    base = type(module)
    width = _float32_input_width(module.gate_proj)
    if width is None:
        return False
    x = mx.random.normal((1, 3, width), key=mx.random.key(width))
    try:
        expect = module(x)
        module.__class__ = routed
        got = module(x)
        tol = 1e-5 * (1.0 + mx.abs(expect).max().item())
        same = expect.shape == got.shape and bool(mx.allclose(got, expect, rtol=1e-5, atol=tol))
    except (TypeError, ValueError, AttributeError):
        same = False
    if not same:
        module.__class__ = base
    return same


def _float32_input_width(proj: nn.Module) -> int | None:
    """Input features of a projection with float32 output: a float32 Linear / QuantizedLinear (float32
    scales), or one the lowp kernels run (16-bit Linear, MXFP4 / NVFP4); None for anything else."""
    if isinstance(proj, lowp.NativeFp4Linear):
        return proj.weight.shape[1] * 32 // proj.bits
    if isinstance(proj, nn.QuantizedLinear) and proj.scales.dtype == mx.float32:
        return proj.weight.shape[1] * 32 // proj.bits
    if isinstance(proj, nn.Linear) and (proj.weight.dtype == mx.float32 or isinstance(proj, lowp.NativeHalfLinear)):
        return proj.weight.shape[1]
    return None
