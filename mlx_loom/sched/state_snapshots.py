"""Prefix caching for hybrid models: recurrent-state snapshots keyed with the KV blocks (pure Python).

A recurrent state cannot be rewound or rebuilt from KV pages, so cached pages alone are not a
reusable prefix for a hybrid model. While a prompt is prefilled, the scheduler ends chunks at
snapshot points (every `interval` blocks and the prompt's last full block) and has the step copy
the row's state into a snapshot slot; the snapshot is registered under the hash of the block that
ends there. A later request whose cached blocks reach such a block restores KV (the blocks) and
state (the snapshot) and prefills only the rest; hits past the deepest snapshot are not used.
A snapshot goes when its block is evicted from the block pool, or when its slot is the least
recently used one and a new snapshot needs it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from mlx_loom.sched.block_pool import BlockHash


class StateSnapshots:
    """Snapshot slots 0..num_slots-1, registered by block hash (LRU)."""

    def __init__(self, num_slots: int, interval: int) -> None:
        if num_slots < 1 or interval < 1:
            raise ValueError(f"snapshots need slots and an interval >= 1, got {num_slots}, {interval}")
        self.num_slots = num_slots
        self.interval = interval
        """Blocks between snapshot points of a prompt (the prompt's last full block is one too)."""
        self._free = list(range(num_slots - 1, -1, -1))
        self._by_hash: OrderedDict[BlockHash, int] = OrderedDict()  # front: least recently used
        self._pending: dict[str, tuple[int, BlockHash]] = {}  # request id -> (slot, hash) being written

    @property
    def num_registered(self) -> int:
        return len(self._by_hash)

    def points(self, num_prompt_tokens: int, block_size: int) -> list[int]:
        """Token positions (block boundaries) after which a prompt's state is snapshotted."""
        last = num_prompt_tokens // block_size
        step = self.interval
        return [b * block_size for b in sorted({*range(step, last + 1, step), last}) if b > 0]

    def deepest(self, hashes: list[BlockHash]) -> tuple[int, int] | None:
        """(number of blocks, snapshot slot) of the deepest snapshot among a run of cached blocks."""
        for n in range(len(hashes), 0, -1):
            slot = self._by_hash.get(hashes[n - 1])
            if slot is not None:
                self._by_hash.move_to_end(hashes[n - 1])
                return n, slot
        return None

    def has(self, block_hash: BlockHash) -> bool:
        return block_hash in self._by_hash

    def reserve(self, request_id: str, block_hash: BlockHash) -> int | None:
        """A slot for the request's next snapshot (the least recently used one if none is free);
        None when every slot is being written this step."""
        self.cancel(request_id)
        if not self._free and self._by_hash:
            _, slot = self._by_hash.popitem(last=False)
            self._free.append(slot)
        if not self._free:
            return None
        slot = self._free.pop()
        self._pending[request_id] = (slot, block_hash)
        return slot

    def commit(self, request_id: str, is_cached: Callable[[BlockHash], bool]) -> None:
        """The step wrote the request's pending snapshot: register it if its block is in the prefix cache."""
        slot, block_hash = self._pending.pop(request_id, (None, None))
        if slot is None:
            return
        if is_cached(block_hash) and block_hash not in self._by_hash:
            self._by_hash[block_hash] = slot
        else:
            self._free.append(slot)

    def cancel(self, request_id: str) -> None:
        """Drop a pending snapshot (the request ended or its step failed before commit)."""
        slot, _ = self._pending.pop(request_id, (None, None))
        if slot is not None:
            self._free.append(slot)

    def evict(self, block_hash: BlockHash) -> None:
        """The block left the prefix cache: its snapshot goes with it."""
        slot = self._by_hash.pop(block_hash, None)
        if slot is not None:
            self._free.append(slot)
