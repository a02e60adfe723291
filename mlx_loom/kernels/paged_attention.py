"""Paged attention: the reference (gather + fused SDPA), a grouped-query MLX path and the native
tiled kernel.

On GPU backends MLX's scaled_dot_product_attention is a real fused kernel, so the reference is
the implementation there. On the CPU it is an unfused composition that repeats K/V per query head
and masks with `where`; the grouped path computes the same with one batched matmul per kv head, an
additive mask and an exp2 softmax. Both still gather every page and build the full [LQ, L] score
matrix, so a 512-query prefill chunk costs ~10x the arithmetic it needs. The native extension's
PagedAttention primitive (mlx_loom/kernels/native/attention_tile.h) runs tiled over the pages with
an online softmax, the heads of a kv group sharing each K/V read: `paged_attention_rows` takes it
on the CPU whenever it applies. All are tested against mlx_loom.kernels.reference.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_loom.kernels import qmm
from mlx_loom.kernels.reference import causal_page_mask, paged_attention_reference, write_kv_reference

_LOG2E = 1.4426950408889634


def paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    q_pos: mx.array,
    scale: float,
) -> mx.array:
    """q [B, H, LQ, D] over pools [HKV, NB, BS, D] via block_tables [B, MB] -> [B, H, LQ, D]."""
    if mx.default_device() == mx.cpu:
        return grouped_paged_attention(q, k_pool, v_pool, block_tables, q_pos, scale)
    return paged_attention_reference(q, k_pool, v_pool, block_tables, q_pos, scale)


def paged_attention_rows(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    q_pos: mx.array,
    scale: float,
) -> mx.array:
    """q [B, LQ, H, D] (token-major, as the runner holds it) -> [B, LQ, H, D]; same attention as
    paged_attention. The native tiled kernel on the CPU (float32, D % 16 == 0), else paged_attention."""
    if native_attention_applies(q, k_pool):
        return qmm.native_module().paged_attention(q, k_pool, v_pool, block_tables, q_pos, scale)
    o = paged_attention(q.transpose(0, 2, 1, 3), k_pool, v_pool, block_tables, q_pos, scale)
    return o.transpose(0, 2, 1, 3)


def native_attention_applies(q: mx.array, k_pool: mx.array) -> bool:
    """The native kernel runs this: built, CPU device, float32 operands, head_dim a multiple of 16."""
    return (qmm.native_available() and mx.default_device() == mx.cpu and q.dtype == mx.float32
            and k_pool.dtype == mx.float32 and q.shape[-1] % 16 == 0)


def grouped_paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    q_pos: mx.array,
    scale: float,
) -> mx.array:
    """Same contract as paged_attention_reference, without repeating K/V per query head."""
    B, H, LQ, D = q.shape
    HKV = k_pool.shape[0]
    rep = H // HKV
    L = block_tables.shape[1] * k_pool.shape[2]
    keys = k_pool[:, block_tables].reshape(HKV, B, L, D)  # gather along pages: no transpose
    values = v_pool[:, block_tables].reshape(HKV, B, L, D)
    # Query head h reads kv head h // rep: group the rep heads of a kv head as extra queries.
    qg = (q * scale).reshape(B, HKV, rep * LQ, D).transpose(1, 0, 2, 3)  # [HKV, B, rep*LQ, D]
    scores = (qg @ keys.swapaxes(-1, -2)).reshape(HKV, B, rep, LQ, L)
    bias = mx.where(causal_page_mask(q_pos, L), 0.0, -mx.inf)  # [B, 1, LQ, L]
    scores = scores + bias[None].astype(scores.dtype)
    probs = _softmax_exp2(scores).reshape(HKV, B, rep * LQ, L)
    out = probs @ values  # [HKV, B, rep*LQ, D]
    return out.transpose(1, 0, 2, 3).reshape(B, H, LQ, D)


def _softmax_exp2(x: mx.array) -> mx.array:
    """Softmax over the last axis via power(2, .); column 0 is never masked, so no row is all -inf."""
    p = mx.power(2.0, (x - x.max(axis=-1, keepdims=True)) * _LOG2E)
    return p / p.sum(axis=-1, keepdims=True)


def write_kv(pool: mx.array, slots: mx.array, values: mx.array) -> mx.array:
    """Write values [T, HKV, D] at flat slots [T] of pool [HKV, NB, BS, D]; returns the pool.

    The scatter reuses the pool's buffer when nothing else holds it (MLX donation), so the
    caller must drop its old reference by rebinding to the result.
    """
    return write_kv_reference(pool, slots, values)
