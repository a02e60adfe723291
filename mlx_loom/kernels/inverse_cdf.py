"""One token per row from softmax(x / T) by inverse CDF in vocabulary order (the sampler's "full" rows).

Reference (`draw_full_reference`, the tested contract, any device): p = 2^((x - max x) * scale)
with scale = log2(e) / T, p < min_p zeroed (p_max is 1, so that is min_p * p_max), then the index
where the running sum of p first exceeds u * sum(p). On the CPU, MLX's power is a scalar libm call
per value (~0.25 ms per 49k-token row, most of a sampled step's sampling); the native primitive
(kernels/native/sample_tile.h) computes the same draw with a vector exp2 in one pass over the row
(~20x faster). Its exp2 and summation order differ from MLX's in the last bits, so a u that lands
within rounding of a boundary between two tokens can pick the neighbour: the draw has the same
distribution, and the same row with the same u always gives the same token on one machine (every
path - alone, batched, pipelined or not - calls this same function).
"""

from __future__ import annotations

import mlx.core as mx

from mlx_loom.kernels import qmm


def draw_full(x: mx.array, scale: mx.array, min_p: mx.array, u: mx.array, any_min_p: bool) -> mx.array:
    """Token [S] int32 per row of x [S, V] float32; scale, min_p, u [S] float32."""
    if qmm.native_on_cpu() and x.dtype == mx.float32 and x.ndim == 2 and x.shape[-1] > 0:
        return qmm.native_module().inverse_cdf_sample(x, scale, min_p, u)
    return draw_full_reference(x, scale, min_p, u, any_min_p)


def draw_full_reference(x: mx.array, scale: mx.array, min_p: mx.array, u: mx.array, any_min_p: bool) -> mx.array:
    xmax = mx.max(x, axis=-1, keepdims=True)  # [S, 1]
    p = exp2((x - xmax) * scale[:, None])  # [S, V], 1.0 at the top token
    if any_min_p:
        p = p * (p >= min_p[:, None])  # p_max == 1, so this is p < min_p * p_max
    return inverse_cdf(p, u)


def exp2(a: mx.array) -> mx.array:
    # 2 ** a rather than exp: MLX's CPU exp is 2-3x slower than its power; same accuracy here.
    return mx.power(2.0, a)


def inverse_cdf(p: mx.array, u: mx.array) -> mx.array:
    """Index [S] where the cumsum of unnormalized p [S, N] first exceeds u * total.

    u <= 1 - 2**-24 makes u * total < total in float32, so the index is < N and has p > 0:
    a zeroed (excluded) token is never picked. Clamped to N - 1 all the same, so that no row (say,
    one whose every p is 0) can ever index past its candidates.
    """
    c = mx.cumsum(p, axis=-1)  # [S, N]
    t = u * c[:, -1]  # [S]
    return mx.minimum(mx.sum(c <= t[:, None], axis=-1), p.shape[-1] - 1).astype(mx.int32)
