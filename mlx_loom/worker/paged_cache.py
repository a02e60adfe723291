"""mlx-lm's cache protocol over the paged KV pools: one layer's view for one model call.

An mlx-lm attention layer calls `cache.offset` (RoPE positions), `cache.update_and_fetch(k, v)`
(store this call's keys/values, get back everything the queries may attend to; `keys_and_values()`
gives that again) and its model calls `cache.make_mask(N, window_size=...)` once per call. `PagedLayerCache` answers these for
B rows of L queries each, at different positions (per-row `offset`, as mlx-lm's BatchKVCache
does): keys are written at each token's pool slot and read back through each row's block table,
so the model's own attention code runs over our pages. Nothing of mlx-lm is patched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import mlx.core as mx

from mlx_loom.kernels.paged_attention import write_kv
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.kv_pools import KVPools, pad_pages, pages_of

if TYPE_CHECKING:
    from mlx_loom.worker.decode_mirror import DecodeMirror, MirrorPlan


@dataclass(frozen=True)
class PagedBatch:
    """B rows of L queries each for one model call; row b's queries sit at offset[b] + 0..L-1."""

    offset: mx.array  # [B] int32
    slots: mx.array  # [B*L] int32 flat pool slot of every query token, row-major
    block_tables: mx.array  # [B, MB] int32 pages up to each row's last query, padded with its first
    q_len: int


def paged_batch(rows: Sequence[ScheduledRow], block_size: int) -> PagedBatch:
    """Rows of equal query length (decode rows, one prefill chunk, rows with k drafts)."""
    q_len = len(rows[0].token_ids)
    assert all(len(r.token_ids) == q_len for r in rows), "one call takes rows of one query length"
    pages = [r.block_ids[: (r.start_pos + q_len - 1) // block_size + 1] for r in rows]
    width = max(len(p) for p in pages)
    slots = [r.block_ids[p // block_size] * block_size + p % block_size
             for r in rows for p in range(r.start_pos, r.start_pos + q_len)]
    return PagedBatch(
        offset=mx.array([r.start_pos for r in rows], dtype=mx.int32),
        slots=mx.array(slots, dtype=mx.int32),
        block_tables=mx.array([pad_pages(p, width) for p in pages], dtype=mx.int32),
        q_len=q_len,
    )


class PagedLayerCache:
    """Layer `index` of `pools` for one call over `batch` (the mlx-lm cache protocol). With a decode
    mirror (and its plan for this call, batch rows in its slot order) keys are read from the mirror
    instead of gathered from the pages."""

    def __init__(self, pools: KVPools, index: int, batch: PagedBatch,
                 mirror: tuple[DecodeMirror, MirrorPlan] | None = None) -> None:
        self.pools = pools
        self.index = index
        self.batch = batch
        self.window = pools.layers[index].window
        self.mirror = mirror
        self._fetched: tuple[mx.array, mx.array] | None = None  # what update_and_fetch returned in this call

    @property
    def offset(self) -> mx.array:
        return self.batch.offset  # [B]: RoPE adds it per row

    @property
    def keys(self) -> mx.array:
        """The layer's key pool. mlx-lm's pipeline() ties a stage's send to its last cache
        (`cache[-1].keys = mx.depends(cache[-1].keys, h)`), so evaluating the pools runs the send."""
        return self.pools.k[self.index]

    @keys.setter
    def keys(self, value: mx.array) -> None:
        self.pools.k[self.index] = value

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """keys [B, HKV, L, Dk], values [B, HKV, L, Dv] -> every key of each row's pages [B, HKV, MB*BS, D]."""
        p, i, b = self.pools, self.index, self.batch
        p.k[i] = write_kv(p.k[i], b.slots, _tokens_major(keys).astype(p.k[i].dtype))
        p.v[i] = write_kv(p.v[i], b.slots, _tokens_major(values).astype(p.v[i].dtype))
        if self.mirror is not None:
            mirror, plan = self.mirror
            self._fetched = mirror.update(i, plan, keys, values)
        else:
            self._fetched = _gather(p.k[i], b.block_tables), _gather(p.v[i], b.block_tables)
        return self._fetched

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        """What this call's queries may attend to, as update_and_fetch returned it, under the same mask
        (mlx-lm's cache protocol: gemma3n's KV-sharing layers read the layer they share this way)."""
        if self._fetched is None:
            raise RuntimeError("keys_and_values before update_and_fetch in this call")
        return self._fetched

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **_: object) -> mx.array:
        """bool [B, 1, N, W]: key j is visible to query i of row b iff j <= offset[b] + i (and within
        the window). W: MB*BS, or the mirror's width; padding sits past every row's last query."""
        if self.mirror is not None:
            width = self.mirror[1].width
        else:
            width = self.batch.block_tables.shape[1] * self.pools.block_size
        q_pos = self.batch.offset[:, None, None, None] + mx.arange(N)[:, None]  # [B, 1, N, 1]
        k_pos = mx.arange(width)  # [MB*BS]
        mask = k_pos <= q_pos
        window = window_size or self.window
        if window is not None:
            mask = mask & (q_pos < k_pos + window)
        return mask

    def is_trimmable(self) -> bool:
        return False  # the scheduler, not the model, decides what a row's pages hold


def _tokens_major(x: mx.array) -> mx.array:
    """[B, HKV, L, D] -> [B*L, HKV, D], the order of PagedBatch.slots."""
    B, HKV, L, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * L, HKV, D)


def _gather(pool: mx.array, tables: mx.array) -> mx.array:
    """pool [HKV, NB, BS, D] through tables [B, MB] -> [B, HKV, MB*BS, D]."""
    return pages_of(pool, tables).transpose(1, 0, 2, 3)
