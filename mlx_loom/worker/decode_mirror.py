"""A dense copy of the decode group's KV, kept across steps, that the model's attention reads in place.

The generic path hands the model's own attention every key a row may see as one dense
[B, HKV, S, D] array (what mlx-lm's attention code takes). Gathering those from the pages each
step copies the whole live KV once per step: a quarter of a generic decode step at N = 100 on a
CPU. The decode group mostly keeps its rows from one step to the next, so the mirror keeps that
dense array: each step writes one new key/value per row into it (in place: MLX reuses the buffer),
and only rows that join, or whose slot moves, are copied in from their pages. When it must grow
(more rows, or a row past its columns) it is rebuilt from the pages in one gather, with room to
spare (twice the rows, 128 more columns).

The pools stay the truth: every write still goes to them first. A row is served from the mirror
only while the mirror holds exactly its positions 0..start_pos-1 (the same request, one position
further than last time); anything else (a row that was preempted, rolled back, computed in another
group, or that failed) is copied in again. The mirror is bounded by a byte cap: a step whose group
does not fit runs on the gather instead, and the mirror is freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.kv_pools import KVPools, pad_pages, pages_of

COLUMN_STEP = 128
"""Columns grow with this many positions to spare (a rebuild every 128 decode steps; slots double).
A rebuild writes the whole mirror into fresh memory: ~5 decode steps' time at N = 100 on a CPU."""


@dataclass(frozen=True)
class MirrorPlan:
    """How one decode call uses the mirror: its rows sit in slots 0..n-1, in the call's batch order."""

    order: tuple[int, ...]  # the group's row indices in slot order
    width: int  # columns the call attends to: the largest position + 1
    write_rows: dict[int, mx.array]  # per HKV: [HKV*n] int32 rows of D where each slot's new key/value goes
    rebuild: mx.array | None  # [slots, cols/BS] int32 every slot's pages: the mirror is gathered anew
    fill_slots: tuple[int, ...]  # otherwise: the slots copied in from their pages
    fill_tables: mx.array | None  # [J, MB] int32 their pages (padded with their first page)
    fill_width: int


class DecodeMirror:
    """Per layer k [HKV, slots, cols, Dk] and v [HKV, slots, cols, Dv] (engine thread only): head-major
    like the pools, so a rebuild is one gather; the attention reads transposed views (no copy)."""

    def __init__(self, pools: KVPools, max_bytes: int) -> None:
        self.pools = pools
        self.max_bytes = max_bytes
        self.column_bytes = sum(s.kv_heads * (s.k_dim + s.v_dim) for s in pools.layers) * pools.k[0].dtype.size
        """Bytes of one position of one slot, all layers."""
        self.drop()

    @property
    def nbytes(self) -> int:
        return self.slots * self.cols * self.column_bytes

    def drop(self) -> None:
        """Forget everything (a failed step, a group that does not fit, no decode rows): start over."""
        self.k: list[mx.array | None] = [None] * len(self.pools.layers)
        self.v: list[mx.array | None] = [None] * len(self.pools.layers)
        self.slots = self.cols = 0
        self.ids: list[str | None] = []  # the request held in each slot
        self.lengths: list[int] = []  # how many positions (0..length-1) that slot holds
        self._pending: set[int] = set()  # layers the current call has not written yet

    def plan(self, rows: Sequence[ScheduledRow]) -> MirrorPlan | None:
        """Slots for these decode rows (one query each) and what to copy in; None: they do not fit the cap."""
        n, bs = len(rows), self.pools.block_size
        width = max(r.start_pos for r in rows) + 1
        if n > self.slots or width > self.cols:
            if not self._grow(n, width):
                self.drop()
                return None
            order = tuple(range(n))
            pages = self.cols // bs
            tables = [pad_pages(r.block_ids[:pages], pages) for r in rows]
            tables += [tables[0]] * (self.slots - n)  # spare slots: any pages, never read unmasked
            plan = MirrorPlan(order, width, self._write_rows(rows, order), mx.array(tables, dtype=mx.int32),
                              (), None, 0)
        else:
            order, fills = self._assign(rows)
            pages = [rows[order[s]].block_ids[: rows[order[s]].start_pos // bs + 1] for s in fills]
            mb = max(map(len, pages), default=0)
            plan = MirrorPlan(order, width, self._write_rows(rows, order), None, tuple(fills),
                              mx.array([pad_pages(p, mb) for p in pages], dtype=mx.int32) if fills else None,
                              min(self.cols, mb * bs))
        self.ids = [rows[i].request_id for i in order] + [None] * (self.slots - n)
        self.lengths = [rows[i].start_pos + 1 for i in order] + [0] * (self.slots - n)
        self._pending = set(range(len(self.pools.layers)))
        return plan

    def update(self, layer: int, plan: MirrorPlan, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """After the pools took this call's keys/values ([n, HKV, 1, D]): the mirror takes them too (or
        is gathered anew); returns the views [n, HKV, width, D] the model's attention reads."""
        n = len(plan.order)
        self.k[layer] = self._write(self.k[layer], self.pools.k[layer], plan, keys)
        self.v[layer] = self._write(self.v[layer], self.pools.v[layer], plan, values)
        self._pending.discard(layer)
        k, v = self.k[layer][:, :n, : plan.width], self.v[layer][:, :n, : plan.width]
        return k.transpose(1, 0, 2, 3), v.transpose(1, 0, 2, 3)

    def finish(self) -> None:
        """After the model's call: a layer it did not write (a model that skips a cache) voids the mirror."""
        if self._pending:
            self.drop()

    def _write(self, mirror: mx.array | None, pool: mx.array, plan: MirrorPlan, new: mx.array) -> mx.array:
        if plan.rebuild is not None:  # the pool already holds this call's keys
            return pages_of(pool, plan.rebuild)  # [HKV, slots, cols, D]
        if plan.fill_slots:
            pages = pages_of(pool, plan.fill_tables)[:, :, : plan.fill_width]  # [HKV, J, W, D]
            for j, s in enumerate(plan.fill_slots):  # slice copies: MLX's scatter is ~3x slower here
                mirror[:, s : s + 1, : plan.fill_width] = pages[:, j : j + 1]
        HKV, slots, cols, D = mirror.shape
        flat = mirror.reshape(HKV * slots * cols, D)
        flat[plan.write_rows[HKV]] = new.transpose(1, 0, 2, 3).reshape(-1, D).astype(mirror.dtype)  # rows (h, s)
        return flat.reshape(HKV, slots, cols, D)

    def _write_rows(self, rows: Sequence[ScheduledRow], order: Sequence[int]) -> dict[int, mx.array]:
        """Per kv-head count: where slot s's new key/value of head h goes in [HKV, slots, cols, D] seen as
        rows of D, (h * slots + s) * cols + position; built once per call, not per layer."""
        positions = mx.array([rows[i].start_pos for i in order], dtype=mx.int32)  # [n]
        slot = mx.arange(len(order), dtype=mx.int32)
        return {h: ((mx.arange(h, dtype=mx.int32)[:, None] * self.slots + slot) * self.cols + positions).reshape(-1)
                for h in {s.kv_heads for s in self.pools.layers}}

    def _assign(self, rows: Sequence[ScheduledRow]) -> tuple[tuple[int, ...], list[int]]:
        """(row index per slot 0..n-1, slots to copy in): a row held below slot n, one position further
        than its last call, keeps its slot; the others take the free ones."""
        n = len(rows)
        held = {rid: s for s, rid in enumerate(self.ids) if rid is not None and s < n}
        by_slot: list[int | None] = [None] * n
        for i, r in enumerate(rows):
            s = held.get(r.request_id)
            if s is not None and self.lengths[s] == r.start_pos:
                by_slot[s] = i
        kept = {i for i in by_slot if i is not None}
        free = [s for s in range(n) if by_slot[s] is None]
        for s, i in zip(free, (i for i in range(n) if i not in kept)):
            by_slot[s] = i
        return tuple(by_slot), free  # type: ignore[arg-type]

    def _grow(self, n: int, width: int) -> bool:
        """New sizes for n slots of width columns, with room to spare; False when even the smaller room
        is over the cap: a mirror rebuilt every few steps would cost more than the gather it saves."""
        bs = self.pools.block_size  # columns are whole pages: a rebuild gathers them
        slot_options = (self.slots,) if n <= self.slots else (max(2 * n, 8), n + max(1, n // 4))
        col_options = (self.cols,) if width <= self.cols else tuple(
            -(-(width + room) // bs) * bs for room in (COLUMN_STEP, COLUMN_STEP // 2))
        for slots in slot_options:
            for cols in col_options:
                if slots * cols * self.column_bytes <= self.max_bytes:
                    self.drop()  # the old arrays go before the new ones are gathered,
                    mx.clear_cache()  # and their freed buffers back to the system (a larger size is needed)
                    self.slots, self.cols = slots, cols
                    return True
        return False
