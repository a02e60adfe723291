"""Gated MLP activation. Reference: mlx.nn.silu(gate) * up. `route_gated_mlps` switches only the
mlx-lm MLP classes listed in KNOWN_SWIGLU_MLPS (exact classes) to the native call.

MLX's CPU exp and sigmoid cost ~20 ns per element (scalar libm). The native extension's SiluMul
primitive (mlx_loom/kernels/native/activation_tile.h: a vector exp2, all cores) runs it when built;
otherwise, on the CPU, silu is written as x / (1 + 2^(-x log2 e)), power(2, x) being ~3x cheaper
than exp there. A 512-token prefill of SmolLM2 spent ~0.25 s in this activation with MLX's ops.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

from mlx_loom.kernels import lowp, qmm
from mlx_loom.kernels.mlx_lm_classes import mlx_lm_classes

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
    """Mixin for the mlx-lm MLP classes whose call is down_proj(swiglu(gate_proj(x), up_proj(x))):
    the native primitive where it runs (float32 on the CPU), else mlx-lm's own swiglu, so the
    result is the class's own computation whatever the dtype or device."""

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_proj(x), self.up_proj(x)
        native = qmm.native_on_cpu() and gate.dtype == up.dtype == mx.float32 and gate.shape == up.shape
        return self.down_proj(qmm.native_module().silu_mul(gate, up) if native else swiglu(gate, up))


def _known_swiglu_mlps() -> frozenset[type]:
    """mlx-lm MLP classes whose call is exactly down_proj(swiglu(gate_proj(x), up_proj(x))), swiglu being
    silu(gate) * up (read from their source; tests/test_module_routing.py checks each against its own
    call on large and edge-case inputs). Only these are switched: a subclass or any other class (a
    clamp, a scale, a bias, another activation: step3p5's Step3p5MLP clamps) keeps its own code."""
    names = ("llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmo2", "granite", "cohere", "exaone4",
             "ministral3", "internlm3")
    return mlx_lm_classes(*(f"{name}.MLP" for name in names), "deepseek_v2.DeepseekV2MLP",
                          "deepseek_v3.DeepseekV3MLP")


KNOWN_SWIGLU_MLPS: frozenset[type] = _known_swiglu_mlps()
_ROUTED: dict[type, type] = {}


def unrouted_type(module: nn.Module) -> type:
    """The model's own class of `module` (route_gated_mlps switches instances to a subclass)."""
    return getattr(type(module), "_loom_base", type(module))


def routed_class(base: type) -> type:
    """The subclass of `base` (one of KNOWN_SWIGLU_MLPS) whose call runs silu_mul."""
    return _ROUTED.setdefault(base, type(f"NativeGated{base.__name__}", (_NativeGatedMLP, base), {"_loom_base": base}))


def route_gated_mlps(model: nn.Module) -> int:
    """Switch every MLP of `model` whose class is exactly one of KNOWN_SWIGLU_MLPS (never a subclass)
    to a subclass running silu_mul: mlx-lm's swiglu is an MLX CPU sigmoid at ~15 ns per value. Only
    where the native primitive runs (float32 projections on the CPU: other dtypes would round
    differently from the model's own activation). Returns how many were switched."""
    if not qmm.native_on_cpu():
        return 0
    switched = 0
    for _, module in model.named_modules():
        if type(module) in KNOWN_SWIGLU_MLPS and _float32_projections(module):
            module.__class__ = routed_class(type(module))
            switched += 1
    return switched


def _float32_projections(module: nn.Module) -> bool:
    return all(_is_float32_linear(module[k]) for k in ("gate_proj", "up_proj", "down_proj"))


def _is_float32_linear(proj: object) -> bool:
    """A projection whose output is float32: a plain or affine-quantized Linear with float32 weights /
    scales, or one the lowp kernels run (16-bit Linear, MXFP4 / NVFP4); exact classes, routed ones included."""
    if isinstance(proj, (lowp.NativeHalfLinear, lowp.NativeFp4Linear)):
        return True
    if isinstance(proj, nn.QuantizedLinear):
        return getattr(proj, "mode", "affine") == "affine" and proj.scales.dtype == mx.float32
    return isinstance(proj, nn.Linear) and proj.weight.dtype == mx.float32
