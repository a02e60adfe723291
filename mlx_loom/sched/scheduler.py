"""Continuous-batching scheduler (pure Python, vLLM v1 style).

Each step it decides which tokens of which requests run: running requests first (a decode
row costs one token, an unfinished prompt a chunk), then waiting requests in arrival order
while the token budget, the row cap and the KV pool allow. Prefill is chunked under
max_num_batched_tokens, with budget kept for every running decode row, and while anyone else
decodes or waits a prompt takes at most long_prefill_chunk tokens per step: a long prompt slows
down, it never holds back a short request's first token or a running stream. When a running request cannot
get a block, the most recently admitted running request is preempted by recompute: its
blocks are freed and it goes back to the front of the queue with its tokens so far.

Hybrid models (recurrent state beside attention) also need a state slot per running request
(state_slots.py): admission waits for a free one, and finish, abort and preemption give it back.
With prefix caching, their prompts' chunks end at snapshot points and the step snapshots the state
there (state_snapshots.py); a prefix hit is used only up to the deepest snapshot, which the row
restores into its slot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from mlx_loom.sched.config import CacheConfig, SchedulerConfig
from mlx_loom.sched.kv_cache_manager import KVCacheManager, cdiv
from mlx_loom.sched.request import Request, RequestStatus
from mlx_loom.sched.state_slots import StateSlots
from mlx_loom.sched.state_snapshots import StateSnapshots


@dataclass(frozen=True)
class ScheduledRow:
    """Tokens of one request computed in this step."""

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    """Position of token_ids[0] in the request's sequence."""
    block_ids: tuple[int, ...]
    """The request's whole block table after this step's allocation."""
    sample: bool
    """True when token_ids ends the known sequence, so the step samples the next token."""
    num_draft: int = 0
    """Speculative tokens at the end of token_ids (not yet part of the sequence): the step needs
    logits at the last num_draft + 1 positions, and only the accepted ones become computed."""
    state_slot: int = -1
    """The request's recurrent-state slot (hybrid models; -1: the model keeps no state). The state
    there holds the tokens before start_pos; at start_pos 0 the row starts from a zero state."""
    restore_from: int = -1
    """A prefix hit of a hybrid: copy this state snapshot into the row's slot before the step."""
    snapshot_to: int = -1
    """Copy the row's state into this snapshot slot after the step (its chunk ends at a snapshot point)."""


@dataclass(frozen=True)
class SchedulerOutput:
    rows: tuple[ScheduledRow, ...]
    num_batched_tokens: int
    preempted_ids: tuple[str, ...] = ()


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig, num_blocks: int,
                 num_state_slots: int | None = None, num_state_snapshots: int = 0) -> None:
        self.config = config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.state_slots = StateSlots(num_state_slots) if num_state_slots is not None else None
        """Recurrent-state slots of a hybrid model (None: the model keeps only KV)."""
        self.snapshots: StateSnapshots | None = None
        """State snapshots keyed with the cached blocks (a hybrid with prefix caching)."""
        if self.state_slots is not None and cache_config.enable_prefix_caching and num_state_snapshots > 0:
            self.snapshots = StateSnapshots(num_state_snapshots, cache_config.state_snapshot_interval)
            self.kv.pool.on_evict = self.snapshots.evict
        self.requests: dict[str, Request] = {}
        """Unfinished requests by id."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Admission order: the last one is preempted first."""
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        """In tokens: prompt tokens looked up / found in the prefix cache at first admission."""

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_blocks(self) -> int:
        return self.kv.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.kv.num_free_blocks

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- requests in and out ---------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError (nothing queued) if it could never run."""
        self._check_fits(request)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        """Finish an unfinished request as aborted and free its blocks; None if unknown/finished."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def _check_fits(self, req: Request) -> None:
        max_len = self.config.max_model_len
        if req.num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: send at least one token")
        if req.num_prompt_tokens >= max_len:
            raise ValueError(
                f"the prompt has {req.num_prompt_tokens} tokens but the context is {max_len}: "
                "shorten the prompt")
        need = cdiv(self._max_len(req), self.block_size)
        if need > self.num_blocks:
            raise ValueError(
                f"the request needs {need} KV cache blocks (prompt {req.num_prompt_tokens} + "
                f"max_tokens {req.params.max_tokens} tokens, {self.block_size} per block) but the "
                f"pool has {self.num_blocks}: lower max_tokens or shorten the prompt")

    def _max_len(self, req: Request) -> int:
        return min(req.num_prompt_tokens + req.params.max_tokens, self.config.max_model_len)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        preempted: list[str] = []
        # Budget kept for the decode rows not scheduled yet and for the head of the queue, so
        # running prompts never take it.
        decodes_left = sum(1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        cap = self._prefill_cap()
        reserved = decodes_left + self._admission_reserve(cap)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining == 1:
                reserved -= 1
                num_new = 1
            else:
                num_new = self._cut(req, req.num_computed_tokens, min(remaining, budget - reserved, cap))
                if num_new <= 0:
                    i += 1
                    continue  # the decode rows behind it take the rest of this step
            block_ids = self._allocate_or_preempt(req, num_new, preempted)
            if block_ids is None:
                break  # req preempted itself: it was the last running one
            rows.append(self._row(req, num_new, block_ids))
            budget -= num_new
            i += 1
        if not preempted:
            budget = self._admit(budget, rows, cap)
        return SchedulerOutput(tuple(rows), self.config.max_num_batched_tokens - budget, tuple(preempted))

    def _prefill_cap(self) -> int:
        """Most prompt tokens one request may take this step: the whole budget when it runs alone."""
        cap = self.config.long_prefill_chunk
        if cap == 0 or len(self.running) + len(self.waiting) <= 1:
            return self.config.max_num_batched_tokens
        return cap

    def _allocate_or_preempt(self, req: Request, num_new: int, preempted: list[str]) -> tuple[int, ...] | None:
        while True:
            block_ids = self.kv.allocate_slots(req, num_new)
            if block_ids is not None:
                return block_ids
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is req:
                return None

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._free_state(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _admission_reserve(self, cap: int) -> int:
        """Budget kept for the first waiting request (capped prefill only): one joins every step."""
        if self.config.long_prefill_chunk == 0 or not self.waiting or len(self.running) >= self.config.max_num_seqs:
            return 0
        return min(cap, self.waiting[0].num_tokens)

    def _admit(self, budget: int, rows: list[ScheduledRow], cap: int) -> int:
        """Move waiting requests to running, FCFS, while budget, rows and blocks allow."""
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if self.state_slots is not None and self.state_slots.num_free == 0:
                break  # every state slot is held: wait for a running request to end
            hits, num_cached = self.kv.get_computed_blocks(req)
            restore = -1
            if self.state_slots is not None:
                hits, restore = self._usable_hits(req, hits)
                num_cached = len(hits) * self.block_size
            num_new = self._cut(req, num_cached, min(req.num_tokens - num_cached, budget, cap))
            block_ids = self.kv.allocate_slots(req, num_new, hits)
            if block_ids is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            if self.state_slots is not None:
                self.state_slots.allocate(req.request_id)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
                self.prefix_cache_queries += req.num_prompt_tokens
                self.prefix_cache_hits += num_cached
            req.num_computed_tokens = num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            rows.append(self._row(req, num_new, block_ids, restore))
            budget -= num_new
        return budget

    def _usable_hits(self, req: Request, hits: list) -> tuple[list, int]:
        """A hybrid's prefix hits up to its deepest state snapshot, and that snapshot (-1: none)."""
        if self.snapshots is None or not hits:
            return [], -1
        found = self.snapshots.deepest(self.kv.block_hashes(req)[: len(hits)])
        if found is None:
            return [], -1
        n, slot = found
        return hits[:n], slot

    def _cut(self, req: Request, start: int, num_new: int) -> int:
        """A hybrid's prompt chunk ends at the first snapshot point inside it (its state is snapshotted there)."""
        if self.snapshots is None:
            return num_new
        for point in self.snapshots.points(req.num_prompt_tokens, self.block_size):
            if start < point < start + num_new:
                return point - start
        return num_new

    def _row(self, req: Request, num_new: int, block_ids: tuple[int, ...], restore: int = -1) -> ScheduledRow:
        start = req.num_computed_tokens
        end = start + num_new
        slot = self.state_slots.slot_of(req.request_id) if self.state_slots is not None else None
        return ScheduledRow(req.request_id, tuple(req.all_token_ids[start:end]), start, block_ids,
                            sample=end == req.num_tokens, state_slot=-1 if slot is None else slot,
                            restore_from=restore, snapshot_to=self._snapshot_slot(req, end))

    def _snapshot_slot(self, req: Request, end: int) -> int:
        """The snapshot slot the row's state goes to after the step, when its chunk ends at a snapshot
        point not snapshotted yet; else -1."""
        if self.snapshots is None or end not in self.snapshots.points(req.num_prompt_tokens, self.block_size):
            return -1
        block_hash = self.kv.block_hashes(req)[end // self.block_size - 1]
        if self.snapshots.has(block_hash):
            return -1
        slot = self.snapshots.reserve(req.request_id, block_hash)
        return -1 if slot is None else slot

    # -- results ---------------------------------------------------------------------------
    def update_from_output(self, output: SchedulerOutput, sampled: Mapping[str, Sequence[int]],
                           stop_after: Collection[str] = ()) -> list[Request]:
        """Advance each scheduled request; the requests that got tokens or finished.

        sampled[rid] is one token, or for a speculative row the accepted drafts plus the target's
        token. A stop token (EOS unless ignore_eos, or a stop_token_id) finishes the request
        without being appended, as OpenAI servers do not return it; tokens after a finish are
        dropped. Requests in stop_after (e.g. their grammar is complete) finish as stopped after
        their tokens are appended.
        """
        changed = []
        for row in output.rows:
            req = self.requests.get(row.request_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            tokens = sampled[row.request_id] if row.sample else ()
            # Rejected drafts were computed but are not part of the sequence.
            req.num_computed_tokens += len(row.token_ids) - row.num_draft + max(0, len(tokens) - 1)
            status = None
            for token in tokens:
                status = self._append(req, token)
                if status is not None:
                    break
            # After the appends: accepted drafts are computed tokens only once they are known ones
            # (a stop token or max_tokens can cut the list; that request finishes below anyway).
            req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens)
            self.kv.cache_blocks(req)
            if row.snapshot_to >= 0:
                self.snapshots.commit(req.request_id, lambda h: self.kv.pool.get_cached_block(h) is not None)
            if not row.sample:
                continue
            if status is None and row.request_id in stop_after:
                status = RequestStatus.FINISHED_STOPPED
            if status is not None:
                self._finish(req, status)
            changed.append(req)
        return changed

    def _append(self, req: Request, token: int) -> RequestStatus | None:
        """Append token unless it stops the request; the finished status, if any."""
        p = req.params
        if req.is_stop_token(token):
            return RequestStatus.FINISHED_STOPPED
        req.append_output_token(token)
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _free_state(self, req: Request) -> None:
        if self.state_slots is not None:
            self.state_slots.free(req.request_id)
        if self.snapshots is not None:
            self.snapshots.cancel(req.request_id)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """The one exit: blocks back to the pool, request out of every queue."""
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req)
        self._free_state(req)
        req.status = status
        del self.requests[req.request_id]
