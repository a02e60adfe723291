"""RMSNorm and RoPE for the op-by-op path. References: mx.fast.rms_norm, and the rotation
mx.fast.rope applies (rope_reference, written out so per-token positions need no broadcasting).

On MLX's CPU backend mx.fast.rms_norm and mx.fast.rope run as their compositions: a RoPE with
per-token offsets is ~25 small ops (~100 us a call at decode) and a narrow 16-layer model's decode
step spent a quarter of its time there. The native extension's RmsNorm / Rope primitives
(mlx_loom/kernels/native/rope_norm.cpp, the same row code as the fused decode layer) run them on
the CPU; other backends keep MLX's fused kernels (the runner then calls the model's own modules).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels import qmm


def rms_norm(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    """x [..., DM] * rsqrt(mean(x^2) + eps) * weight [DM]."""
    if qmm.native_on_cpu() and x.dtype == weight.dtype == mx.float32:
        return qmm.native_module().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: mx.array, weight: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, weight, eps)


def rope(x: mx.array, positions: mx.array, inv_freq: mx.array, traditional: bool) -> mx.array:
    """x [T, heads, D] with row t rotated for position positions[t] ([T] int32); inv_freq [D/2]."""
    if qmm.native_on_cpu() and x.dtype == mx.float32:
        return qmm.native_module().rope(x, positions, inv_freq, traditional)
    return rope_reference(x, positions, inv_freq, traditional)


def rope_reference(x: mx.array, positions: mx.array, inv_freq: mx.array, traditional: bool) -> mx.array:
    T, H, D = x.shape
    theta = positions.astype(mx.float32)[:, None] * inv_freq[None]  # [T, D/2]
    cos, sin = mx.cos(theta)[:, None], mx.sin(theta)[:, None]  # [T, 1, D/2]
    if traditional:  # pairs (2i, 2i+1)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(T, H, D)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]  # halves
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


class NativeRMSNorm(nn.RMSNorm):
    """An nn.RMSNorm whose call is rms_norm (the native primitive on the CPU)."""

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.weight, self.eps)


class NativeRoPE(nn.RoPE):
    """An nn.RoPE over the whole head whose call runs the native primitive on the CPU for mlx-lm's
    shapes (x [B, H, L, D], offset an int or [B] per-row offsets); anything else is nn.RoPE's own."""

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        per_row = isinstance(offset, mx.array) and offset.ndim == 1 and offset.shape[0] == x.shape[0]
        plain = isinstance(offset, int) or (isinstance(offset, mx.array) and offset.ndim == 0)
        if x.ndim != 4 or x.shape[-1] != self.dims or x.dtype != mx.float32 or not (per_row or plain) \
                or not qmm.native_on_cpu():
            return super().__call__(x, offset)
        B, H, L, D = x.shape
        positions = (mx.broadcast_to(mx.array(offset, dtype=mx.int32).reshape(-1, 1), (B, 1))
                     + mx.arange(L, dtype=mx.int32)).reshape(B * L)  # [B*L]
        tokens = x.transpose(0, 2, 1, 3).reshape(B * L, H, D)  # mlx-lm's q/k are views of [B, L, H, D]
        out = qmm.native_module().rope(tokens, positions, self._inv_freq(), self.traditional)
        return out.reshape(B, L, H, D).transpose(0, 2, 1, 3)

    def _inv_freq(self) -> mx.array:
        cached = getattr(self, "_loom_inv_freq", None)
        if cached is None:
            cached = fast_rope_inv_freq(self.dims, self.base, self.scale)
            object.__setattr__(self, "_loom_inv_freq", cached)  # not a parameter of the module
        return cached


def fast_rope_inv_freq(dims: int, base: float, scale: float = 1.0) -> mx.array:
    """[dims/2] float32 as mx.fast.rope computes them (exp(-i * log(base) / (dims/2))), the position
    scale folded in (exact for scale 1). Another formula (base ** (-2i/dims)) differs by an ulp,
    which position 3000 turns into 3e-4 of rotated q/k."""
    half = dims // 2
    inv = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
    return (inv * scale if scale != 1.0 else inv).astype(mx.float32)


PLAIN_NORMS = (nn.RMSNorm, NativeRMSNorm)
"""nn.RMSNorm and its routed class: the same computation (structural checks accept both)."""
PLAIN_ROPES = (nn.RoPE, NativeRoPE)


def route_norm_rope_modules(model: nn.Module) -> int:
    """Make every nn.RMSNorm / nn.RoPE of `model` the native-call subclass above (a class switch,
    parameters and names unchanged), so the model's own code runs the native primitives on the
    CPU. Returns how many modules were switched."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.RMSNorm:
            module.__class__ = NativeRMSNorm
        elif type(module) is nn.RoPE and module.base is not None:
            module.__class__ = NativeRoPE
        else:
            continue
        switched += 1
    return switched
