"""Request -> KV blocks, prefix-cache lookups and the one place blocks are freed (pure Python).

Modelled on vLLM v1's KVCacheManager. The slot of position p of a request is
block_ids[p // block_size] * block_size + p % block_size.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlx_loom.sched.block_pool import (
    BlockHash,
    BlockPool,
    KVCacheBlock,
    hash_block_tokens,
)
from mlx_loom.sched.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, tuple[int, ...]] = {}  # rebuilt only when a table grows
        self._hashes: dict[str, list[BlockHash]] = {}  # chained hashes of the full blocks seen so far
        self._num_cached: dict[str, int] = {}  # leading blocks already registered in the prefix cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def get_block_ids(self, request_id: str) -> tuple[int, ...]:
        return self._block_ids.get(request_id, ())

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest run of cached full blocks at the start of the request, and its length in tokens.

        Never the whole sequence: the last token is left to compute so the step has its logits.
        Takes no references; pass the blocks to allocate_slots before anything else allocates.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in self._block_hashes(request)[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_blocks: Sequence[KVCacheBlock] = ()
    ) -> tuple[int, ...] | None:
        """Grow the request's table to hold num_new_tokens more tokens; None if the pool is short.

        new_computed_blocks are prefix-cache hits for a request that holds no blocks yet; they
        cover the tokens right after request.num_computed_tokens. Returns the whole block table.
        """
        assert num_new_tokens > 0, num_new_tokens
        rid = request.request_id
        blocks = self._blocks.get(rid, [])
        if new_computed_blocks and blocks:
            raise ValueError(f"request {rid} already holds blocks; prefix hits apply only to its first allocation")
        num_tokens = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_new = cdiv(num_tokens, self.block_size) - len(blocks) - len(new_computed_blocks)
        # Hits sitting in the free queue stop being free once touched.
        num_reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new > self.pool.num_free_blocks - num_reclaimed:
            return None
        if rid not in self._blocks:
            self._blocks[rid] = blocks
            self._num_cached[rid] = len(new_computed_blocks)
        self.pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        if num_new > 0:
            blocks.extend(self.pool.get_new_blocks(num_new))
        if num_new > 0 or new_computed_blocks or rid not in self._block_ids:
            self._block_ids[rid] = tuple(b.block_id for b in blocks)
        return self._block_ids[rid]

    def cache_blocks(self, request: Request) -> None:
        """Register the request's newly full, computed blocks in the prefix cache."""
        rid = request.request_id
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_cached.get(rid, 0)
        if not self.enable_caching or num_full <= start:
            return
        blocks = self._blocks[rid]
        assert num_full <= len(blocks), (rid, num_full, len(blocks))
        hashes = self._block_hashes(request)
        for i in range(start, num_full):
            self.pool.cache_full_block(blocks[i], hashes[i])
        self._num_cached[rid] = num_full

    def free(self, request: Request) -> None:
        """The one place blocks go back (finish, abort, preemption): tail first, so it is evicted first."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, [])
        self._block_ids.pop(rid, None)
        self._hashes.pop(rid, None)
        self._num_cached.pop(rid, None)
        self.pool.free_blocks(reversed(blocks))

    def block_hashes(self, request: Request) -> list[BlockHash]:
        """Chained hashes of the request's full blocks of known tokens (block i: tokens up to (i+1)*block_size)."""
        return self._block_hashes(request)

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of every full block of the request's known tokens, extended incrementally."""
        hashes = self._hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes
