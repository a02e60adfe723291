"""Sparse prefill attention (MInference 1.0, arXiv 2407.02490) in 64x64 tiles, pure MLX.

Contract (mlx_loom/kernels/sparse_prefill_reference.py, same names with `_reference`): q [B, H, LQ, D] at
positions q_offset .. q_offset+LQ-1, k/v [B, HKV, >=L, D] dense with L = q_offset+LQ (keys past
L are ignored, so a chunk's gathered pages can be passed as they are), causal, grouped-query
heads (query head h reads kv head kv_heads[h], default h // (H / HKV)) -> [B, H, LQ, D].

Work is skipped, not masked: queries are cut into 64-row tiles, and each query tile gathers
only its selected 64-key tiles (plus, for vertical-slash and A-shape, a few single key columns
shared by all tiles), so scores, the exp2 softmax and P @ V cost NB*64 + NC per query instead
of L. Only the tiles on the diagonal (causality), tile 0 (front padding) and unused slots are
masked. MLX's CPU exp is scalar; power(2, .) on log2e-scaled scores is ~2x cheaper.

- vertical-slash: online index from the chunk's last 64 queries: vertical = top columns by
  summed attention (the first SINK_COLUMNS always), slash = top tile-diagonals by the attention
  left after the verticals, each diagonal weighted by the share of its rows a tile-diagonal
  holds (tile-diagonals 0 and 1, the local window, always).
- A-shape: the first n_sink keys and the n_local nearest keys (tile-diagonals).
- block-sparse: per query tile the top key tiles by mean-pooled q . k (own, previous and first
  tile always).

Engine plug-in (mlx_loom/worker/runner.py, one prefill chunk of layer i, queries at start .. start+LQ-1):
    if should_use_sparse(start + LQ, config, q_len=LQ):      # mlx_loom.kernels.sparse_patterns, host ints only
        k = k_pool[:, table].reshape(1, HKV, -1, D)          # pages [HKV, MB, BS, D], no transpose
        v = v_pool[:, table].reshape(1, HKV, -1, D)
        o = sparse_prefill_attention(q, k, v, start, scale, config.layer(i))  # q [1, H, LQ, D]
Decode rows and short chunks stay on the dense paged path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx

from mlx_loom.kernels import qmm
from mlx_loom.kernels.paged_attention import native_attention_applies
from mlx_loom.kernels.sparse_patterns import HeadPattern, covers_all
from mlx_loom.kernels.sparse_prefill_reference import TILE, num_tiles, tile_shift

LOG2E = 1.4426950408889634
NEG = -1e30  # finite "minus infinity": a fully masked padding row stays finite
SINK_COLUMNS = 32  # first keys every vertical-slash head keeps (attention sinks)
LOCAL_TILES = 2  # tile-diagonals every vertical-slash head keeps (>= 64 nearest keys)
_FORCE = 1e9  # score of forced picks (real scores are sums of <= 64 probabilities)


@dataclass(frozen=True)
class TileIndex:
    """What each query tile attends to (one row of the batch, Hs query heads)."""

    blocks: mx.array  # [Hs, NQ, NB] int32 absolute key tiles (clamped to >= 0)
    block_ok: mx.array  # [Hs, NQ, NB] bool: slot in use (False: padding, outside the causal range)
    columns: mx.array | None = None  # [Hs, NC] int32 key positions in padded coordinates


@dataclass(frozen=True)
class Tiles:
    """A chunk cut into tiles: queries padded at the front to NQ*64, keys to NK*64."""

    q: mx.array  # [Hs, NQ, 64, D], pre-scaled by scale * log2(e)
    k: mx.array  # [HKV, NK, 64, D]
    v: mx.array  # [HKV, NK, 64, D]
    kv: mx.array  # [Hs] int32 kv head of each query head
    shift: int  # front key padding (padded position = position + shift)
    q_pad: int  # front query padding
    base: int  # key tile of query tile 0

    @property
    def query_tiles(self) -> mx.array:
        return self.base + mx.arange(self.q.shape[1])  # [NQ] absolute tile of each query tile


def make_tiles(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float, kv: mx.array) -> Tiles:
    """One batch row: q [Hs, LQ, D], k/v [HKV, >=L, D]."""
    Hs, LQ, D = q.shape
    L = q_offset + LQ
    shift, NQ, NK = tile_shift(L), num_tiles(LQ), num_tiles(L)
    q_pad = NQ * TILE - LQ
    qs = mx.pad(q * (scale * LOG2E), [(0, 0), (q_pad, 0), (0, 0)]) if q_pad else q * (scale * LOG2E)
    kp = mx.pad(k[:, :L], [(0, 0), (shift, 0), (0, 0)]) if shift else k[:, :L]
    vp = mx.pad(v[:, :L], [(0, 0), (shift, 0), (0, 0)]) if shift else v[:, :L]
    HKV = k.shape[0]
    return Tiles(q=qs.reshape(Hs, NQ, TILE, D), k=kp.reshape(HKV, NK, TILE, D), v=vp.reshape(HKV, NK, TILE, D),
                 kv=kv, shift=shift, q_pad=q_pad, base=NK - NQ)


def tile_attention(t: Tiles, index: TileIndex) -> mx.array:
    """Attention of every query tile over its index -> [Hs, LQ, D]. On the CPU the native
    SparseTileAttention primitive runs it (same contract, tiled with an online softmax)."""
    if _native_tiles(t):
        return _native_tile_attention(t, index)
    Hs, NQ, _, D = t.q.shape
    HKV, NK = t.k.shape[:2]
    NB = index.blocks.shape[2]
    flat = t.kv[:, None, None] * NK + index.blocks  # [Hs, NQ, NB] rows of [HKV*NK, 64, D]
    keys = t.k.reshape(HKV * NK, TILE, D)[flat].reshape(Hs, NQ, NB * TILE, D)
    values = t.v.reshape(HKV * NK, TILE, D)[flat].reshape(Hs, NQ, NB * TILE, D)
    s = t.q @ keys.swapaxes(-1, -2)  # [Hs, NQ, 64, NB*64], log2 units
    s = mx.where(_block_visible(t, index), s, NEG)
    m = s.max(axis=-1, keepdims=True)
    if index.columns is None:
        p = mx.power(2.0, s - m)
        out = (p @ values) / p.sum(axis=-1, keepdims=True)  # [Hs, NQ, 64, D]
    else:
        sc, vc = _column_scores(t, index)  # [Hs, NQ, 64, NC], [Hs, 1, NC, D]
        m = mx.maximum(m, sc.max(axis=-1, keepdims=True))
        p, pc = mx.power(2.0, s - m), mx.power(2.0, sc - m)
        total = p.sum(axis=-1, keepdims=True) + pc.sum(axis=-1, keepdims=True)
        out = (p @ values + pc @ vc) / total
    return out.reshape(Hs, NQ * TILE, D)[:, t.q_pad :]


def _native_tiles(t: Tiles) -> bool:
    return native_attention_applies(t.q, t.k)


def _native_tile_attention(t: Tiles, index: TileIndex) -> mx.array:
    Hs, NQ, _, D = t.q.shape
    HKV, NK = t.k.shape[:2]
    columns = index.columns if index.columns is not None else mx.zeros((Hs, 0), dtype=mx.int32)
    # t.q is already scaled by scale * log2(e): the kernel applies its own, so pass 1 / log2(e)
    out = qmm.native_module().sparse_tile_attention(
        t.q.reshape(Hs, NQ * TILE, D), t.k.reshape(HKV, NK * TILE, D), t.v.reshape(HKV, NK * TILE, D),
        t.kv.astype(mx.int32), index.blocks.astype(mx.int32), index.block_ok, columns.astype(mx.int32),
        t.shift, t.base, 1.0 / LOG2E)
    return out[:, t.q_pad :]


def _block_visible(t: Tiles, index: TileIndex) -> mx.array:
    """bool [Hs, NQ, 64, NB*64]: slot in use, key not padding, key <= query."""
    Hs, NQ, NB = index.blocks.shape
    ar = mx.arange(TILE)
    kpos = (index.blocks[..., None] * TILE + ar).reshape(Hs, NQ, 1, NB * TILE)
    qpos = (t.query_tiles[:, None] * TILE + ar)[None, :, :, None]  # [1, NQ, 64, 1]
    ok = mx.repeat(index.block_ok, TILE, axis=2)[:, :, None, :]  # [Hs, NQ, 1, NB*64]
    return ok & (kpos <= qpos) & (kpos >= t.shift)


def _column_scores(t: Tiles, index: TileIndex) -> tuple[mx.array, mx.array]:
    """Scores of every query over the shared columns, masked where a column is in the future
    of the query tile or already inside one of its blocks."""
    Hs, NQ, _, D = t.q.shape
    HKV, NK = t.k.shape[:2]
    cols = index.columns  # [Hs, NC]
    # clipped so a column past the keys (a sink count above L) gathers a real row, never memory
    # past the array (garbage NaN * 0 weight is NaN); `ok` masks it by its unclipped tile
    flat = t.kv[:, None] * (NK * TILE) + mx.clip(cols, 0, NK * TILE - 1)  # rows of [HKV*NK*64, D]
    kc = t.k.reshape(HKV * NK * TILE, D)[flat]  # [Hs, NC, D]
    vc = t.v.reshape(HKV * NK * TILE, D)[flat]
    sc = (t.q.reshape(Hs, NQ * TILE, D) @ kc.swapaxes(-1, -2)).reshape(Hs, NQ, TILE, -1)
    ctile = cols // TILE  # [Hs, NC]
    inside = ((index.blocks[..., None] == ctile[:, None, None, :]) & index.block_ok[..., None]).any(axis=2)
    ok = (ctile[:, None, :] < t.query_tiles[None, :, None]) & ~inside & (cols >= t.shift)[:, None, :]
    return mx.where(ok[:, :, None, :], sc, NEG), vc[:, None]


# -- indexes --

def diagonal_index(t: Tiles, tile_diags: mx.array, columns: mx.array | None = None) -> TileIndex:
    """tile_diags [Hs, NS] offsets (0 = own tile) shared by every query tile."""
    blocks = t.query_tiles[None, :, None] - tile_diags[:, None, :]  # [Hs, NQ, NS]
    return TileIndex(mx.maximum(blocks, 0).astype(mx.int32), blocks >= 0, columns)


def a_shape_index(t: Tiles, n_sink: int, n_local: int) -> TileIndex:
    Hs = t.q.shape[0]
    local = max(1, num_tiles(n_local))
    n_sink = min(n_sink, t.k.shape[1] * TILE - t.shift)  # never more sinks than keys
    diags = mx.broadcast_to(mx.arange(local, dtype=mx.int32), (Hs, local))
    sink = mx.broadcast_to(mx.arange(n_sink, dtype=mx.int32) + t.shift, (Hs, n_sink)) if n_sink else None
    return diagonal_index(t, diags, sink)


def vertical_slash_index(t: Tiles, n_vertical: int, n_slash: int) -> TileIndex:
    """Online estimate from the last query tile (the chunk's last <= 64 real queries)."""
    Hs, NK = t.q.shape[0], t.k.shape[1]
    p = _last_tile_probs(t)  # [Hs, 64, L'] attention of the last query tile
    columns = _top_columns(p, t.shift, n_vertical)
    keep = mx.put_along_axis(mx.ones((Hs, NK * TILE)), columns, mx.array(0.0), axis=1)
    diags = _top_tile_diagonals(p * keep[:, None, :], max(LOCAL_TILES, num_tiles(n_slash)))
    return diagonal_index(t, diags, columns)


def _last_tile_probs(t: Tiles) -> mx.array:
    """[Hs, 64, L'] causal attention of the last query tile over the keys (padding rows 0): the
    native LastTileProbs primitive on the CPU (one pass, vector exp2), else MLX ops."""
    Hs, NQ, _, D = t.q.shape
    HKV, NK = t.k.shape[:2]
    first_row = t.q_pad if NQ == 1 else 0  # padding query rows estimate nothing
    if _native_tiles(t):  # t.q is prescaled by scale * log2(e): the kernel's scale must be 1 / log2(e)
        return qmm.native_module().last_tile_probs(t.q[:, -1], t.k.reshape(HKV, NK * TILE, D), t.kv.astype(mx.int32),
                                                   t.shift, first_row, 1.0 / LOG2E)
    keys = t.k.reshape(HKV, NK * TILE, D)[t.kv]  # [Hs, L', D]
    s = t.q[:, -1] @ keys.swapaxes(-1, -2)  # [Hs, 64, L']
    ar = mx.arange(TILE)
    qpos = (NK - 1) * TILE + ar[:, None]  # [64, 1]
    kpos = mx.arange(NK * TILE)[None]
    real_row = (ar >= first_row)[:, None]
    s = mx.where((kpos <= qpos) & (kpos >= t.shift) & real_row, s, NEG)
    p = mx.power(2.0, s - s.max(axis=-1, keepdims=True))
    return mx.where(real_row, p / p.sum(axis=-1, keepdims=True), 0.0)


def _top_columns(p: mx.array, shift: int, n: int) -> mx.array:
    """p [Hs, 64, L'] -> [Hs, n] padded positions: the sinks, then the most attended columns
    outside the local tiles (which the slash part always covers)."""
    Hs, _, Lp = p.shape
    eligible = Lp - LOCAL_TILES * TILE
    score = p.sum(axis=1)[:, :eligible]  # [Hs, eligible] (sum before slicing: strided sums are slow)
    pos = mx.arange(eligible)
    sink = (pos >= shift) & (pos < shift + SINK_COLUMNS)
    score = mx.where(sink, _FORCE, mx.where(pos < shift, -_FORCE, score))
    n = min(n, eligible - shift)
    return mx.argpartition(-score, n - 1, axis=-1)[:, :n].astype(mx.int32)


def _diag_weights() -> mx.array:
    """[64*64, 3]: share of pair (r, u) (query row r, key column u of one key tile) on the
    tile-diagonal through that tile, the next one (r > u) and the previous one (r < u)."""
    r, u = mx.arange(TILE)[:, None], mx.arange(TILE)[None, :]
    d = (r - u).astype(mx.float32) / TILE
    return mx.stack([1.0 - mx.abs(d), mx.maximum(d, 0.0), mx.maximum(-d, 0.0)], axis=-1).reshape(TILE * TILE, 3)


_DIAG_W = _diag_weights()


def _top_tile_diagonals(p: mx.array, n: int) -> mx.array:
    """p [Hs, 64, NK*64] (last query tile's attention) -> [Hs, n] tile-diagonal offsets.

    Tile-diagonal t of the last query tile is key tile NK-1-t; a pair's diagonal lands on t
    for a share 1-|r-u|/64 of the query tiles' rows and on t±1 for the rest.
    """
    Hs, _, Lp = p.shape
    NK = Lp // TILE
    per_tile = p.reshape(Hs, TILE, NK, TILE).transpose(0, 2, 1, 3).reshape(Hs, NK, TILE * TILE) @ _DIAG_W
    own, nxt, prv = (per_tile[:, ::-1, i] for i in range(3))  # index by t = NK-1-j
    zero = mx.zeros((Hs, 1))
    score = own + mx.concatenate([zero, nxt[:, :-1]], axis=1) + mx.concatenate([prv[:, 1:], zero], axis=1)
    score = mx.where(mx.arange(NK) < LOCAL_TILES, _FORCE, score)
    n = min(n, NK)
    return mx.argpartition(-score, n - 1, axis=-1)[:, :n].astype(mx.int32)


def block_sparse_index(t: Tiles, n_keys: int) -> TileIndex:
    """Top key tiles per query tile by mean-pooled (q . k); own, previous and first tile forced."""
    Hs, NQ, _, D = t.q.shape
    NK = t.k.shape[1]
    q_rows = mx.array([TILE - t.q_pad] + [TILE] * (NQ - 1), dtype=mx.float32)[:, None]
    k_rows = mx.array([TILE - t.shift] + [TILE] * (NK - 1), dtype=mx.float32)[:, None]
    qp = t.q.sum(axis=2) / q_rows  # [Hs, NQ, D]
    kp = (t.k.sum(axis=2) / k_rows)[t.kv]  # [Hs, NK, D]
    s = qp @ kp.swapaxes(-1, -2)  # [Hs, NQ, NK]
    j, i = mx.arange(NK)[None, :], t.query_tiles[:, None]  # [1, NK], [NQ, 1]
    forced = (j == i) | (j == i - 1) | (j == 0)
    s = mx.where(j > i, -mx.inf, mx.where(forced, mx.inf, s))
    n = min(num_tiles(n_keys), NK)
    blocks = mx.argpartition(-s, n - 1, axis=-1)[..., :n].astype(mx.int32)  # [Hs, NQ, n]
    return TileIndex(blocks, blocks <= t.query_tiles[None, :, None])


# -- public kernels --

IndexFn = Callable[[Tiles], TileIndex]


def _per_row(q, k, v, q_offset: int, scale: float, kv_heads: mx.array | None, index_fn: IndexFn) -> mx.array:
    B, H = q.shape[:2]
    kv = _kv_heads(H, k.shape[1], kv_heads)
    outs = [tile_attention(t, index_fn(t)) for t in (make_tiles(q[b], k[b], v[b], q_offset, scale, kv)
                                                     for b in range(B))]
    return mx.stack(outs)  # [B, H, LQ, D]


def _kv_heads(H: int, HKV: int, kv_heads: mx.array | None) -> mx.array:
    return kv_heads.astype(mx.int32) if kv_heads is not None else mx.arange(H, dtype=mx.int32) // (H // HKV)


def vertical_slash_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                             n_vertical: int, n_slash: int, kv_heads: mx.array | None = None) -> mx.array:
    """Vertical-slash with the index estimated online from the chunk's last 64 queries."""
    return _per_row(q, k, v, q_offset, scale, kv_heads, lambda t: vertical_slash_index(t, n_vertical, n_slash))


def a_shape_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                      n_sink: int, n_local: int, kv_heads: mx.array | None = None) -> mx.array:
    """The first n_sink keys plus ceil(n_local/64) nearest tile-diagonals."""
    return _per_row(q, k, v, q_offset, scale, kv_heads, lambda t: a_shape_index(t, n_sink, n_local))


def block_sparse_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                           n_keys: int, kv_heads: mx.array | None = None) -> mx.array:
    """ceil(n_keys/64) key tiles per query tile, picked by pooled q . k."""
    return _per_row(q, k, v, q_offset, scale, kv_heads, lambda t: block_sparse_index(t, n_keys))


def indexed_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                      index_fn: IndexFn, kv_heads: mx.array | None = None) -> mx.array:
    """Tile attention with a caller-built index (tests pass the reference's explicit indexes)."""
    return _per_row(q, k, v, q_offset, scale, kv_heads, index_fn)


def dense_prefill_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                            kv_heads: mx.array | None = None) -> mx.array:
    """Dense causal attention: the native tiled kernel where it applies (the keys as one page per
    row), else grouped heads, an additive mask and exp2 in MLX ops."""
    B, H, LQ, D = q.shape
    L = q_offset + LQ
    k, v = k[:, :, :L], v[:, :, :L]
    if kv_heads is not None:
        k, v = k[:, kv_heads], v[:, kv_heads]  # [B, H, L, D]
    if native_attention_applies(q, k):
        return _native_dense(q, k, v, q_offset, scale)
    HKV = k.shape[1]
    rep = H // HKV
    qg = (q * (scale * LOG2E)).reshape(B, HKV, rep * LQ, D)  # rep query heads of a kv head as rows
    s = (qg @ k.swapaxes(-1, -2)).reshape(B, HKV, rep, LQ, L)
    bias = mx.where(mx.arange(L)[None, :] <= mx.arange(q_offset, L)[:, None], 0.0, -mx.inf)  # [LQ, L]
    s = s + bias
    p = mx.power(2.0, s - s.max(axis=-1, keepdims=True))
    p = (p / p.sum(axis=-1, keepdims=True)).reshape(B, HKV, rep * LQ, L)
    return (p @ v).reshape(B, H, LQ, D)


def _native_dense(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float) -> mx.array:
    """q [B, H, LQ, D] over k/v [B, HKV, L, D]: row b's keys are page b of a [HKV, B, L, D] pool."""
    B, H, LQ, D = q.shape
    pool_k, pool_v = k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)  # [HKV, B, L, D]
    tables = mx.arange(B, dtype=mx.int32)[:, None]
    q_pos = mx.broadcast_to(mx.arange(q_offset, q_offset + LQ, dtype=mx.int32)[None], (B, LQ))
    out = qmm.native_module().paged_attention(q.transpose(0, 2, 1, 3), mx.contiguous(pool_k), mx.contiguous(pool_v),
                                              tables, q_pos, scale)
    return out.transpose(0, 2, 1, 3)


# -- per-head dispatch --

def run_pattern(pattern: HeadPattern, q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                kv_heads: mx.array | None = None) -> mx.array:
    """One pattern on every head of q (budgets resolved for L = q_offset + LQ)."""
    L = q_offset + q.shape[2]
    a, b = pattern.budgets(L)
    if covers_all(pattern, L):
        return dense_prefill_attention(q, k, v, q_offset, scale, kv_heads)
    if pattern.kind == "vertical_and_slash":
        return vertical_slash_attention(q, k, v, q_offset, scale, a, b, kv_heads)
    if pattern.kind == "a_shape":
        return a_shape_attention(q, k, v, q_offset, scale, a, b, kv_heads)
    return block_sparse_attention(q, k, v, q_offset, scale, a, kv_heads)


def sparse_prefill_attention(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                             patterns: Sequence[HeadPattern]) -> mx.array:
    """Per-head dispatch for one layer: heads sharing a pattern (and budgets) run together, heads
    marked dense (or whose budget covers every key) run dense. q [B, H, LQ, D] -> [B, H, LQ, D]."""
    B, H, LQ, D = q.shape
    assert len(patterns) == H, (len(patterns), H)
    groups = _group_heads(patterns, q_offset + LQ)
    if len(groups) == 1:
        return run_pattern(patterns[0], q, k, v, q_offset, scale)
    rep = H // k.shape[1]
    order, outs = [], []
    for heads in groups.values():
        kv = mx.array([h // rep for h in heads], dtype=mx.int32)
        outs.append(run_pattern(patterns[heads[0]], q[:, mx.array(heads)], k, v, q_offset, scale, kv))
        order += heads
    inverse = mx.argsort(mx.array(order))
    return mx.concatenate(outs, axis=1)[:, inverse]


def _group_heads(patterns: Sequence[HeadPattern], L: int) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for h, p in enumerate(patterns):
        key = ("dense",) if covers_all(p, L) else (p.kind, *p.budgets(L))
        groups.setdefault(key, []).append(h)
    return groups
