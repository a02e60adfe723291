"""The paged KV pools (per layer, head-major) and the page helpers every reader of them shares."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx

from mlx_loom.models.layout import LayerKV


class KVPools:
    """Per-layer pools k [HKV, NB, BS, Dk] and v [HKV, NB, BS, Dv], addressed by block id."""

    def __init__(self, layers: Sequence[LayerKV], num_blocks: int, block_size: int, dtype: mx.Dtype) -> None:
        self.layers = tuple(layers)
        self.block_size = block_size
        self.num_blocks = num_blocks  # also without KV layers (a pure SSM model pages nothing)
        self.k = [mx.zeros((s.kv_heads, num_blocks, block_size, s.k_dim), dtype=dtype) for s in layers]
        self.v = [mx.zeros((s.kv_heads, num_blocks, block_size, s.v_dim), dtype=dtype) for s in layers]
        mx.eval(self.k, self.v)

    def arrays(self) -> list[mx.array]:
        return [*self.k, *self.v]

    @staticmethod
    def bytes_per_block(layers: Sequence[LayerKV], block_size: int, dtype: mx.Dtype) -> int:
        return sum(s.kv_heads * (s.k_dim + s.v_dim) for s in layers) * block_size * dtype.size


def pad_pages(pages: Sequence[int], width: int) -> list[int]:
    """A block table padded to width with its first page (padding is read, then masked)."""
    return list(pages) + [pages[0]] * (width - len(pages))


def pages_of(pool: mx.array, tables: mx.array) -> mx.array:
    """pool [HKV, NB, BS, D] through tables [B, MB] -> [HKV, B, MB*BS, D] (one gather, head-major)."""
    HKV, _, BS, D = pool.shape
    B, MB = tables.shape
    return pool[:, tables].reshape(HKV, B, MB * BS, D)
