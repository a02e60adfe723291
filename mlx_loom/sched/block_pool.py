"""KV block pool: ref counts, an LRU free queue and the prefix-cache map (pure Python).

Modelled on vLLM v1's BlockPool. A block with ref_cnt 0 sits in the free queue; if it is
full and registered it keeps its hash, so a later request with the same prefix can take it
back (touch) until get_new_blocks evicts it from the front of the queue.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

BlockHash = int
"""hash((parent block's hash or None, tuple of the block's block_size token ids))."""


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Chained hash: equal hashes mean equal blocks AND equal prefixes before them."""
    return hash((parent, tuple(token_ids)))


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    """Requests whose block table holds this block."""
    block_hash: BlockHash | None = None
    """Set while the block is registered in the prefix cache (full blocks only)."""


class BlockPool:
    """Hands out blocks, takes them back, and remembers full blocks by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # Front = evicted first. OrderedDict gives O(1) pop-front, append and remove-by-id.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[BlockHash, KVCacheBlock] = {}
        self.on_evict: Callable[[BlockHash], None] | None = None
        """Called with a block's hash when it leaves the prefix cache (hybrids drop its state snapshot)."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, including cached ones that can still be evicted."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free_block_ids(self) -> list[int]:
        """The free queue, front (next evicted) first; for tests and debugging."""
        return list(self._free)

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take n blocks from the front of the free queue, evicting their cached hashes."""
        if n > len(self._free):
            raise ValueError(f"asked for {n} blocks, only {len(self._free)} free (check num_free_blocks first)")
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            assert block.ref_cnt == 0, block
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-cache hits; a free one leaves the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, ordered: Iterable[KVCacheBlock]) -> None:
        """Drop a reference on each block, in the given order (the first freed is evicted first).

        A freed block with a hash joins the back of the queue (reusable until evicted);
        one without a hash holds nothing worth keeping, so it goes to the front.
        """
        for block in ordered:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Register a full, computed block under its hash; False if another block has it."""
        assert block.block_hash is None and block.ref_cnt > 0, block
        if not self.enable_caching or block_hash in self._cached:
            return False  # a twin computed the same prefix: keep the first, this one stays private
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            assert self._cached.get(block.block_hash) is block
            del self._cached[block.block_hash]
            if self.on_evict is not None:
                self.on_evict(block.block_hash)
            block.block_hash = None
