"""Draft proposals for speculative decoding: a draft model, optionally fed by a cheaper level.

ModelDrafter runs a draft model (the target's own weights cast to MXFP4, or a smaller model
with the same tokenizer) over its own paged KV pools, indexed by the same block ids as the
target's, so the scheduler's allocation covers both. The draft's KV for a request is brought
up to date lazily (`kv_end` per request): when a request starts speculating, its first draft
row is a catch-up chunk over every token the draft has not seen yet; after verification the
valid part is what the target accepted. A request that was preempted starts again from 0.

Multi-level (ML-SpecQD): with a sub-proposer (n-gram lookup, or another ModelDrafter), each
draft forward verifies the sub-proposer's tokens (longest matching prefix + one draft token,
or rejection sampling for sampled rows), so the draft emits several tokens per forward; the
target then verifies the draft's tokens. Emitted tokens keep the draft's own distribution q,
which the target's rejection sampling needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import mlx.core as mx
import numpy as np

from mlx_loom.sched.params import SamplingParams
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.spec.acceptance import greedy_accept, rejection_accept
from mlx_loom.spec.probs import biased, is_greedy, processed_probs
from mlx_loom.worker.runner import ModelRunner


FUSED_ROW_TOKENS = 40
"""A draft's rows up to this many tokens run on the fused decode layer: catch-up plus the
sub-level's proposals (k <= 16); a new request's first catch-up (its prompt) runs op by op."""


@dataclass
class DraftItem:
    """One row to draft for: its known tokens (the last one is at position len(tokens) - 1)."""

    request_id: str
    tokens: Sequence[int]
    block_ids: tuple[int, ...]
    params: SamplingParams
    rng: np.random.Generator
    num_preemptions: int = 0
    max_draft: int | None = None
    """At most this many tokens for this row (its KV slots end there); None: the call's k."""


@dataclass
class Draft:
    tokens: list[int]
    q: np.ndarray | None
    """[k, V] distributions the tokens were drawn from (sampled rows); None for greedy rows."""


@dataclass
class LevelStats:
    proposed: int = 0
    accepted: int = 0


class Proposer(Protocol):
    stats: LevelStats

    def propose(self, items: Sequence[DraftItem], k: int) -> dict[str, Draft]: ...

    def settle(self, request_id: str, valid_len: int) -> None: ...

    def forget(self, request_id: str) -> None: ...


class NgramLevel:
    """Prompt-lookup proposals (no forward pass); deterministic, so q is None."""

    def __init__(self, min_n: int = 1, max_n: int = 4) -> None:
        from mlx_loom.spec.ngram import NgramProposer

        self.ngram = NgramProposer(min_n=min_n, max_n=max_n)
        self.stats = LevelStats()

    def propose(self, items: Sequence[DraftItem], k: int) -> dict[str, Draft]:
        return {it.request_id: Draft(self.ngram.propose(it.tokens, _limit(it, k)), None) for it in items}

    def settle(self, request_id: str, valid_len: int) -> None:
        pass

    def forget(self, request_id: str) -> None:
        pass


@dataclass
class _Row:
    item: DraftItem
    seq: list[int]  # known tokens + drafted so far
    start: int  # len(item.tokens): where drafted tokens begin
    limit: int  # tokens to draft: the row's KV slots hold no more
    q: list[np.ndarray] = field(default_factory=list)

    @property
    def drafted(self) -> list[int]:
        return self.seq[self.start :]


class ModelDrafter:
    def __init__(self, model, num_blocks: int, block_size: int, dtype: mx.Dtype,
                 sub: Proposer | None = None) -> None:
        # MXFP4 / NVFP4 drafts run fused, their catch-up rows (the last draft and the target's token
        # after a fully accepted step: 2 tokens) and the sub-level's rows included.
        self.runner = ModelRunner(model, num_blocks, block_size, dtype, fused_row_tokens=FUSED_ROW_TOKENS)
        self.sub = sub
        self.stats = LevelStats()  # the sub-level's tokens verified by this draft
        self._kv_end: dict[str, tuple[int, int]] = {}  # request -> (num_preemptions, tokens with draft KV)

    def forget(self, request_id: str) -> None:
        self._kv_end.pop(request_id, None)
        if self.sub is not None:
            self.sub.forget(request_id)

    def settle(self, request_id: str, valid_len: int) -> None:
        """After the target's verdict: draft KV is valid for at most the first valid_len tokens."""
        if request_id in self._kv_end:
            pre, end = self._kv_end[request_id]
            self._kv_end[request_id] = (pre, min(end, valid_len))
        if self.sub is not None:
            self.sub.settle(request_id, valid_len)

    def kv_end(self, item: DraftItem) -> int:
        pre, end = self._kv_end.get(item.request_id, (item.num_preemptions, 0))
        return end if pre == item.num_preemptions else 0

    def propose(self, items: Sequence[DraftItem], k: int) -> dict[str, Draft]:
        rows = [_Row(it, list(it.tokens), len(it.tokens), _limit(it, k)) for it in items]
        kv = {it.request_id: self.kv_end(it) for it in items}
        while True:
            # A row drafting past its limit would write KV past the slots allocated for it.
            active = [r for r in rows if len(r.drafted) < r.limit]
            if not active:
                break
            self._forward(active, kv)
        for r in rows:
            self._kv_end[r.item.request_id] = (r.item.num_preemptions, kv[r.item.request_id])
        return {r.item.request_id: Draft(r.drafted[: r.limit], np.stack(r.q[: r.limit]) if r.q else None)
                for r in rows}

    def _forward(self, rows: list[_Row], kv: dict[str, int]) -> None:
        """One draft forward over rows: each emits >= 1 token (more when sub-proposals are accepted)."""
        subs = self._sub_proposals(rows)
        sched = []
        for r in rows:
            rid = r.item.request_id
            tokens = r.seq[kv[rid] :] + subs[rid].tokens
            sched.append(ScheduledRow(rid, tuple(tokens), kv[rid], r.item.block_ids, sample=True,
                                      num_draft=len(subs[rid].tokens)))
        logits, sample_rows = self.runner.execute(sched)  # [sum(1 + num_draft), V]
        logits = np.array(logits.astype(mx.float32))
        at = 0
        for i in sample_rows:
            r, row = rows[i], sched[i]
            n = row.num_draft + 1
            self._emit(r, subs[r.item.request_id], logits[at : at + n])
            at += n
            # KV now valid for the known part of this forward's input: up to the emitted tokens.
            kv[r.item.request_id] = min(row.start_pos + len(row.token_ids), len(r.seq) - 1)
            if self.sub is not None:
                self.sub.settle(r.item.request_id, len(r.seq) - 1)

    def _sub_proposals(self, rows: list[_Row]) -> dict[str, Draft]:
        """The sub-level's proposals per row: at most what is still missing, minus the draft's own token."""
        out = {r.item.request_id: Draft([], None) for r in rows}
        if self.sub is None:
            return out
        for r in rows:
            want = r.limit - len(r.drafted) - 1
            if want > 0:
                item = replace(r.item, tokens=r.seq, max_draft=want)
                out.update(self.sub.propose([item], want))
        return out

    def _emit(self, r: _Row, sub: Draft, logits: np.ndarray) -> None:
        """logits [n, V] at the last token and the sub-proposals: accept, then append the tokens."""
        params = r.item.params
        if is_greedy(params):
            tokens = greedy_accept(sub.tokens, list(np.argmax(biased(logits, params), axis=-1)))
            probs = None
        else:
            probs = processed_probs(logits, params)  # [n, V]
            tokens = (rejection_accept(sub.tokens, sub.q, probs, r.item.rng) if sub.tokens
                      else [int(r.item.rng.choice(probs.shape[-1], p=probs[0]))])
            r.q.extend(probs[: len(tokens)])
        self.stats.proposed += len(sub.tokens)
        self.stats.accepted += len(tokens) - 1
        r.seq.extend(int(t) for t in tokens)


def _limit(item: DraftItem, k: int) -> int:
    return k if item.max_draft is None else min(k, item.max_draft)
