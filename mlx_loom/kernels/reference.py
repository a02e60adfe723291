"""Pure-MLX reference implementations: the tested contract for every kernel in mlx_loom/kernels/.

Dims: B rows, H query heads, HKV kv heads, LQ queries per row, L keys, D head dim,
NB pages in the pool, BS tokens per page, MB pages per row's block table.
KV pools are laid out [HKV, NB, BS, D]: gathering a row's pages along axis 1 then yields
each head's keys contiguous ([HKV, B, MB*BS, D]) with no transpose.
"""

from __future__ import annotations

import mlx.core as mx


def gather_pages(pool: mx.array, block_tables: mx.array) -> mx.array:
    """pool [HKV, NB, BS, D], block_tables [B, MB] -> dense keys [B, HKV, MB*BS, D]."""
    B, MB = block_tables.shape
    HKV, _, BS, D = pool.shape
    pages = pool[:, block_tables]  # [HKV, B, MB, BS, D]
    return mx.contiguous(pages.reshape(HKV, B, MB * BS, D).transpose(1, 0, 2, 3))


def causal_page_mask(q_pos: mx.array, num_keys: int) -> mx.array:
    """q_pos [B, LQ] absolute query positions -> bool mask [B, 1, LQ, num_keys].

    Key j is visible to a query at position p iff j <= p. Keys past a row's context are
    always at positions > p, so the same test hides the padding pages.
    """
    key_pos = mx.arange(num_keys, dtype=q_pos.dtype)
    return (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]


def paged_attention_reference(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_tables: mx.array,
    q_pos: mx.array,
    scale: float,
) -> mx.array:
    """Attention of queries over paged keys/values: gather to dense, then fused SDPA.

    q [B, H, LQ, D]; k_pool, v_pool [HKV, NB, BS, D]; block_tables [B, MB] int32 (padding
    entries may be any valid page id); q_pos [B, LQ] int32 absolute positions; returns
    [B, H, LQ, D]. The queries' own keys must already be written to the pool.
    """
    keys = gather_pages(k_pool, block_tables)  # [B, HKV, L, D]
    values = gather_pages(v_pool, block_tables)
    mask = causal_page_mask(q_pos, keys.shape[2])  # [B, 1, LQ, L]
    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)


def write_kv_reference(pool: mx.array, slots: mx.array, values: mx.array) -> mx.array:
    """Write values [T, HKV, D] at flat slots [T] (page * BS + offset) of pool [HKV, NB, BS, D]."""
    HKV, NB, BS, D = pool.shape
    flat = pool.reshape(HKV, NB * BS, D)
    flat[:, slots] = values.transpose(1, 0, 2)
    return flat.reshape(HKV, NB, BS, D)


def dense_causal_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float) -> mx.array:
    """Plain attention over contiguous keys: q [B, H, LQ, D], k/v [B, HKV, L, D].

    Queries sit at positions q_offset .. q_offset+LQ-1; written with explicit matmuls and
    softmax (no fused op) so it checks the fused path independently.
    """
    B, H, LQ, D = q.shape
    HKV, L = k.shape[1], k.shape[2]
    rep = H // HKV
    k = mx.repeat(k, rep, axis=1)  # [B, H, L, D]
    v = mx.repeat(v, rep, axis=1)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # [B, H, LQ, L]
    q_pos = mx.arange(LQ)[:, None] + q_offset
    visible = mx.arange(L)[None, :] <= q_pos  # [LQ, L]
    scores = mx.where(visible, scores, -mx.inf)
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(v.dtype) @ v
