"""RMSNorm and RoPE for the op-by-op path. References: mx.fast.rms_norm, and the rotation
mx.fast.rope applies (rope_reference, written out so per-token positions need no broadcasting).

On MLX's CPU backend mx.fast.rms_norm and mx.fast.rope run as their compositions: a RoPE with
per-token offsets is ~25 small ops (~100 us a call at decode) and a narrow 16-layer model's decode
step spent a quarter of its time there. The native extension's RmsNorm / Rope primitives
(mlx_loom/kernels/native/rope_norm.cpp, the same row code as the fused decode layer) run them on
the CPU; other backends keep MLX's fused kernels (the runner then calls the model's own modules).
"""

from __future__ import annotations

import mlx.core as mx

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
