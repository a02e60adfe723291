"""Paged attention dispatcher.

The contract is `kernels.reference.paged_attention_reference` (gather pages to dense, then
MLX's fused SDPA). A faster backend-specific kernel plugs in here when one exists; on every
backend today the reference is the implementation, so there is nothing to pick yet.
"""

from __future__ import annotations

import mlx.core as mx

from kernels.reference import paged_attention_reference


def paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    q_pos: mx.array,
    scale: float,
) -> mx.array:
    """q [B, H, LQ, D] over pools [NB, BS, HKV, D] via block_tables [B, MB] -> [B, H, LQ, D]."""
    return paged_attention_reference(q, k_pool, v_pool, block_tables, q_pos, scale)


def write_kv(pool: mx.array, slots: mx.array, values: mx.array) -> mx.array:
    """Write values [T, HKV, D] at flat slots [T] of pool [NB, BS, HKV, D]; returns the pool.

    The scatter reuses the pool's buffer when nothing else holds it (MLX donation), so the
    caller must drop its old reference by rebinding to the result.
    """
    NB, BS, HKV, D = pool.shape
    flat = pool.reshape(NB * BS, HKV, D)
    flat[slots] = values
    return flat.reshape(NB, BS, HKV, D)
