"""The model-generic step: the model's own mlx-lm code over the paged pools.

Rows are grouped by query length (all decode rows in one call, rows with k drafts in another,
each prefill chunk length in its own), and each group is one call of the mlx-lm model with one
`PagedLayerCache` per cache entry. Rows in a call sit at different positions (per-row offsets),
so decode rows of any lengths batch together.

Only the positions that are sampled need logits. When the model's class is one of mlx-lm's whose
call is its body (`model.model`) followed by a plain head (`lm_head` or the tied embedding), listed
in mlx_loom/models/heads.py, the head runs on those positions only; any other class (a
softcap, a logit scale, a subclass) runs whole, its own code.

The decode group (one query per row) reads its keys from a dense mirror kept across steps
(decode_mirror.py) when one fits its byte cap, instead of gathering every row's pages each step.

A cache entry that is a CacheList (models/layout.py splits it into members: a state and a KV cache,
falcon_h1; one KV cache per attention sublayer, longcat_flash) gets mlx-lm's own CacheList over its
members' cache objects.

Hybrid models get, for each recurrent-state entry of their cache, a `SlotStateCache` over the rows'
state slots (state_cache.py) in the model's own cache order; after the call, what the model wrote
there goes back to the slots. A chunked prompt continues its row's state from chunk to chunk. Rows
that start their sequence share a call with rows that continue theirs (their state is zeros there),
except for model classes whose own code treats a missing state otherwise than a zero one
(models/layout.py `fresh_state_apart`): there they get calls of their own, which see None as mlx-lm's do.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import CacheList

from mlx_loom.models.heads import Head, plain_head
from mlx_loom.models.layout import Entry, fresh_state_apart
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.decode_mirror import DecodeMirror
from mlx_loom.worker.kv_pools import KVPools
from mlx_loom.worker.paged_cache import PagedBatch, PagedLayerCache, paged_batch
from mlx_loom.worker.state_cache import SlotStateCache
from mlx_loom.worker.state_pools import StatePools

class GenericForward:
    """One step as calls of the model's own code, grouped by query length (engine thread only)."""

    def __init__(self, model: nn.Module, pools: KVPools, mirror_bytes: int = 0,
                 states: StatePools | None = None, entries: Sequence[Entry] | None = None) -> None:
        self.model = model
        self.pools = pools
        self.states = states
        """The recurrent-state slots of a hybrid model (None: KV only)."""
        self.entries = tuple(entries) if entries is not None else tuple(("kv", j) for j in range(len(pools.layers)))
        """Per cache entry of the model: ("kv", KV layer), ("state", state entry) or ("list", members)."""
        self.head = plain_head(model)
        self.mirror = DecodeMirror(pools, mirror_bytes) if mirror_bytes > 0 else None
        """Dense KV of the decode group, at most mirror_bytes; None: every call gathers pages."""
        self.rows_per_call: int | None = None
        """None: a group is one call. 1: one call per row, for models whose own attention code does not
        batch rows at different positions (the self-check finds them: gemma2 broadcasts a [B, 1, N, L]
        mask against 5-D grouped scores)."""
        self.fresh_apart = states is not None and fresh_state_apart(model)
        """Rows that start their sequence get calls of their own (the model's state None is not zeros)."""

    def __call__(self, rows: Sequence[ScheduledRow], tokens: mx.array | None = None) -> tuple[mx.array, tuple[int, ...]]:
        """(logits [S, V] float32, sampling rows in index order): num_draft + 1 logits rows each.
        tokens [T]: decode rows' input tokens on the device, instead of row.token_ids."""
        groups: dict[object, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(i if self.rows_per_call == 1 else self._group_key(row), []).append(i)
        if self.mirror is not None and (self.rows_per_call == 1 or 1 not in groups):
            self.mirror.drop()  # no decode group: free its memory
        picked: dict[int, mx.array] = {}
        written: list[SlotStateCache] = []
        if self.states is not None:
            self.states.restore(rows)  # prefix hits: their snapshots into their slots (a retry copies them again)
        for n, (key, index) in enumerate(groups.items()):
            if n:  # materialize the last call first: a pending read of a pool would make the next write copy it
                mx.eval(list(picked.values()), self.pool_arrays())
            picked.update(self._call(rows, index, tokens, written, key == 1))  # key 1: the decode group
        if self.states is not None:  # only once every call is built: a failed step leaves the states as they were
            for cache in written:
                cache.commit()
            self.states.snapshot(rows)  # rows at a prompt snapshot point
        sample_rows = tuple(sorted(picked))
        if not sample_rows:
            return mx.zeros((0, 0), dtype=mx.float32), ()
        return mx.concatenate([picked[i] for i in sample_rows]).astype(mx.float32), sample_rows

    def pool_arrays(self) -> list[mx.array]:
        """The arrays a step writes: KV pools and state pools."""
        return [*self.pools.k, *self.pools.v, *(self.states.arrays() if self.states is not None else ())]

    def discard_derived(self) -> None:
        """Drop what is derived from the pools (after a failed step the mirror may hold its error)."""
        if self.mirror is not None:
            self.mirror.drop()

    def _group_key(self, row: ScheduledRow) -> object:
        """Rows of one call: the same query length (1: the decode group), apart by start where fresh_apart."""
        if self.fresh_apart and row.start_pos == 0:
            return (len(row.token_ids), "fresh")
        return len(row.token_ids)

    def _call(self, rows: Sequence[ScheduledRow], index: list[int], device_tokens: mx.array | None,
              written: list[SlotStateCache], mirrored: bool) -> dict[int, mx.array]:
        """One call of the model over rows[index]; its state caches are appended to `written`. Only the
        decode group (`mirrored`) reads the decode mirror."""
        group = [rows[i] for i in index]
        plan = None
        if self.mirror is not None and self.rows_per_call != 1 and mirrored:
            plan = self.mirror.plan(group)
        if plan is not None:  # the call's rows in the mirror's slot order
            index = [index[b] for b in plan.order]
            group = [rows[i] for i in index]
        batch = paged_batch(group, self.pools.block_size)
        mirror = (self.mirror, plan) if plan is not None else None
        caches = [self._cache(entry, group, batch, mirror) for entry in self.entries]
        states = [c for entry in caches for c in (entry.caches if isinstance(entry, CacheList) else (entry,))
                  if isinstance(c, SlotStateCache)]
        mx.eval([a for c in states for a in c.inputs()])  # state writes in place
        if device_tokens is None:
            tokens = mx.array([r.token_ids for r in group], dtype=mx.int32)  # [B, L]
        else:  # decode rows: [B, 1]
            tokens = device_tokens[mx.array(index, dtype=mx.int32)][:, None]
        try:
            picked = self._logits(rows, index, tokens, caches, batch.q_len)
            written.extend(states)
            return picked
        finally:
            if plan is not None:
                self.mirror.finish()  # a call that did not write every layer voids the mirror

    def _cache(self, entry: Entry, group: list[ScheduledRow], batch: PagedBatch,
               mirror: tuple | None) -> PagedLayerCache | SlotStateCache | CacheList:
        """The cache object the model's own code gets for one of its cache entries (a CacheList: mlx-lm's
        own class over its members' paged KV and state slots)."""
        kind, j = entry
        if kind == "kv":
            return PagedLayerCache(self.pools, j, batch, mirror)
        if kind == "state":
            return SlotStateCache(self.states, j, group)
        return CacheList(*(self._cache(member, group, batch, mirror) for member in j))

    def _logits(self, rows: Sequence[ScheduledRow], index: list[int], tokens: mx.array,
                caches: list[PagedLayerCache | SlotStateCache | CacheList], L: int) -> dict[int, mx.array]:
        """The model's call; logits of the sampled positions by row index."""
        wanted = {i: list(range(b * L + L - 1 - rows[i].num_draft, b * L + L))
                  for b, i in enumerate(index) if rows[i].sample}
        if not wanted:  # mid-prompt chunks: the KV writes hang off the pools, evaluated by the caller
            self.model.model(tokens, cache=caches) if self.head is not None else self.model(tokens, cache=caches)
            return {}
        flat = mx.array([p for positions in wanted.values() for p in positions], dtype=mx.int32)
        if self.head is not None:
            h = self.model.model(tokens, cache=caches)  # [B, L, DM]
            logits = self.head(h.reshape(-1, h.shape[-1])[flat])  # [S, V]
        else:
            out = self.model(tokens, cache=caches)  # [B, L, V]
            logits = out.reshape(-1, out.shape[-1])[flat]
        out, at = {}, 0
        for i, positions in wanted.items():
            out[i] = logits[at : at + len(positions)]
            at += len(positions)
        return out
