"""Naive masked references for sparse prefill attention: the tested contract of mlx_loom/kernels/sparse_prefill.

Every pattern is an explicit boolean mask [H, LQ, L] built from its index, then one dense
softmax attention with it. Dims: B rows, H query heads, HKV kv heads, LQ queries, L keys,
D head dim. Queries sit at positions q_offset .. q_offset+LQ-1 = L-1 (a chunk's queries are
the suffix of its keys) and a key c is visible to a query p only if c <= p.

Tiles: positions are grouped in 64-wide tiles aligned to the *end* of the keys, so the last
query and the last key close a tile: tile(x) = (x + shift) // 64 with shift = (-L) % 64. Query
tile i of a chunk is key tile base + i, base = ceil(L/64) - ceil(LQ/64); tile-diagonal t of
query tile i is key tile base + i - t.

Indexes (what the fast path estimates online, passed explicitly here):
- vertical-slash: columns [H, NV] key positions visible to every later query, and
  tile_diags [H, NS] tile-diagonal offsets (0 = the query's own tile, always included);
- A-shape: the first n_sink keys plus the n_local_tiles nearest tile-diagonals;
- block-sparse: blocks [H, NQ, NB] absolute key tiles per query tile (own tile included).
"""

from __future__ import annotations

import math

import mlx.core as mx

TILE = 64


def tile_shift(L: int) -> int:
    """Front padding that aligns the end of L keys to a tile edge."""
    return (-L) % TILE


def num_tiles(n: int) -> int:
    return math.ceil(n / TILE)


def tile_of(pos: mx.array, L: int) -> mx.array:
    return (pos + tile_shift(L)) // TILE


def _positions(LQ: int, q_offset: int) -> tuple[mx.array, mx.array, int]:
    L = q_offset + LQ
    return mx.arange(q_offset, L), mx.arange(L), L


def vertical_slash_mask(LQ: int, q_offset: int, columns: mx.array, tile_diags: mx.array) -> mx.array:
    """columns [H, NV] key positions, tile_diags [H, NS] offsets -> bool [H, LQ, L] (before causality)."""
    qp, kp, L = _positions(LQ, q_offset)
    H = columns.shape[0]
    col = mx.zeros((H, L), dtype=mx.int32)
    col = mx.put_along_axis(col, columns.astype(mx.int32), mx.ones_like(columns, dtype=mx.int32), axis=1)
    dt = tile_of(qp, L)[:, None] - tile_of(kp, L)[None, :]  # [LQ, L] tile-diagonal of each pair
    on_slash = (dt[None, :, :, None] == tile_diags[:, None, None, :]).any(axis=-1)  # [H, LQ, L]
    return on_slash | (col[:, None, :] > 0)


def a_shape_mask(LQ: int, q_offset: int, n_sink: int, n_local_tiles: int) -> mx.array:
    """bool [1, LQ, L]: the first n_sink keys and tile-diagonals 0 .. n_local_tiles-1."""
    qp, kp, L = _positions(LQ, q_offset)
    dt = tile_of(qp, L)[:, None] - tile_of(kp, L)[None, :]  # [LQ, L]
    return ((kp[None, :] < n_sink) | (dt < n_local_tiles))[None]


def block_sparse_mask(LQ: int, q_offset: int, blocks: mx.array) -> mx.array:
    """blocks [H, NQ, NB] absolute key tiles per query tile -> bool [H, LQ, L]."""
    qp, kp, L = _positions(LQ, q_offset)
    base = num_tiles(L) - num_tiles(LQ)
    rows = blocks[:, tile_of(qp, L) - base]  # [H, LQ, NB]
    return (tile_of(kp, L)[None, None, :, None] == rows[:, :, None, :]).any(axis=-1)


def masked_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float, mask: mx.array,
                     kv_heads: mx.array | None = None) -> mx.array:
    """q [B, H, LQ, D], k/v [B, HKV, >=L, D], mask bool broadcastable to [H, LQ, L] -> [B, H, LQ, D].

    kv_heads [H] maps query heads to kv heads (default h // (H / HKV)); causality is always added.
    """
    B, H, LQ, D = q.shape
    qp, kp, L = _positions(LQ, q_offset)
    kv = kv_heads if kv_heads is not None else mx.arange(H) // (H // k.shape[1])
    k, v = k[:, kv, :L], v[:, kv, :L]  # [B, H, L, D]
    visible = mask & (kp[None, :] <= qp[:, None])[None]  # [H, LQ, L]
    scores = (q * scale) @ k.swapaxes(-1, -2)  # [B, H, LQ, L]
    scores = mx.where(visible[None], scores.astype(mx.float32), -mx.inf)
    return mx.softmax(scores, axis=-1).astype(v.dtype) @ v


def vertical_slash_reference(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                             columns: mx.array, tile_diags: mx.array, kv_heads: mx.array | None = None) -> mx.array:
    mask = vertical_slash_mask(q.shape[2], q_offset, columns, tile_diags)
    return masked_attention(q, k, v, q_offset, scale, mask, kv_heads)


def a_shape_reference(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                      n_sink: int, n_local_tiles: int, kv_heads: mx.array | None = None) -> mx.array:
    mask = a_shape_mask(q.shape[2], q_offset, n_sink, n_local_tiles)
    return masked_attention(q, k, v, q_offset, scale, mask, kv_heads)


def block_sparse_reference(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                           blocks: mx.array, kv_heads: mx.array | None = None) -> mx.array:
    mask = block_sparse_mask(q.shape[2], q_offset, blocks)
    return masked_attention(q, k, v, q_offset, scale, mask, kv_heads)
