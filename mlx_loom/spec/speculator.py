"""Speculative decoding inside the continuous batch (ML-SpecQD: an MXFP4 self-draft, optionally
fed by n-gram lookup or a smaller model).

Per step, after the scheduler decided the rows:
1. `extend`: the controller picks k (0 = plain step). Each eligible decode row gets k more KV
   slots, the drafter proposes k tokens, and the row becomes last token + drafts with
   num_draft = k (rows without room, or not eligible, stay plain).
2. The target runs the step once; a speculative row yields k+1 logits rows.
3. `verify`: grammar rows get one mask per position (the matcher walks the drafts, then rolls
   back); greedy rows keep the longest prefix equal to the target's argmax plus the target's
   token; sampled rows use rejection sampling, so the output distribution is the target's.
The scheduler then appends the tokens and counts only the accepted drafts as computed: rejected
positions' KV is garbage past the sequence end, overwritten before anything attends to it.

Not speculated (chosen, documented): rows with repetition/presence/frequency penalties (the
target's distribution would depend on the drafts) and rows that want logprobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import mlx.core as mx
import numpy as np

from mlx_loom.sched.request import Request
from mlx_loom.sched.scheduler import ScheduledRow, Scheduler, SchedulerOutput
from mlx_loom.spec.acceptance import PositionCounts, greedy_accept, rejection_accept
from mlx_loom.spec.controller import LinearCost, SpecController, SpecCosts
from mlx_loom.spec.drafter import (
    Draft,
    DraftItem,
    LevelStats,
    ModelDrafter,
    NgramLevel,
    Proposer,
)
from mlx_loom.spec.probs import biased, is_greedy, processed_probs


@dataclass(frozen=True)
class SpecStatsSnapshot:
    enabled: bool
    num_drafts: int  # speculative rows verified by the target
    proposed: tuple[int, ...]  # per level: level 1 = draft tokens verified by the target
    accepted: tuple[int, ...]
    last_modelled_speedup: float


class Speculator:
    def __init__(self, drafter: ModelDrafter, controller: SpecController, max_model_len: int) -> None:
        self.drafter = drafter
        self.controller = controller
        self.max_model_len = max_model_len
        self.target = LevelStats()
        self.num_drafts = 0
        self.by_position = {"greedy": PositionCounts(), "sampled": PositionCounts()}
        """Target-level acceptance by draft position, greedy and sampled rows apart (benchmarks)."""
        self._drafts: dict[str, Draft] = {}

    # -- before the forward --
    def extend(self, out: SchedulerOutput, scheduler: Scheduler) -> SchedulerOutput:
        reqs = scheduler.requests
        candidates = [i for i, row in enumerate(out.rows) if self._eligible(row, reqs[row.request_id])]
        k = self.controller.choose_k(len(out.rows), [out.rows[i].request_id for i in candidates])
        self._drafts = {}
        if k == 0 or not candidates:
            return out
        rows = list(out.rows)
        items = []
        for i in candidates:
            req = reqs[rows[i].request_id]
            kk = min(k, req.params.max_tokens - len(req.output_token_ids) - 1,
                     self.max_model_len - req.num_tokens - 1)
            block_ids = scheduler.kv.allocate_slots(req, 1 + kk) if kk > 0 else None
            if block_ids is None:
                continue  # no room: this row decodes plainly
            rows[i] = replace(rows[i], block_ids=block_ids)
            items.append((i, kk, DraftItem(req.request_id, req.all_token_ids, block_ids, req.params,
                                           _rng(req, _DRAFT_STREAM), req.num_preemptions, max_draft=kk)))
        if not items:
            return out
        drafts = self.drafter.propose([it for _, _, it in items], max(kk for _, kk, _ in items))
        for i, kk, item in items:
            d = drafts[item.request_id]
            d = Draft(d.tokens[:kk], d.q[:kk] if d.q is not None else None)
            self._drafts[item.request_id] = d
            row = rows[i]
            rows[i] = replace(row, token_ids=row.token_ids + tuple(d.tokens), num_draft=len(d.tokens))
        return replace(out, rows=tuple(rows))

    @staticmethod
    def _eligible(row: ScheduledRow, req: Request) -> bool:
        p = req.params
        return (row.sample and len(row.token_ids) == 1 and not p.has_penalties and not p.wants_logprobs
                and len(req.output_token_ids) + 1 < p.max_tokens)

    # -- after the forward --
    def verify(self, req: Request, logits: np.ndarray, num_valid: int) -> list[int]:
        """logits [k+1, V] of one speculative row (masked already when constrained) -> tokens to append.

        num_valid: how many drafts the grammar allows (all of them for free rows)."""
        draft = self._drafts.pop(req.request_id)
        tokens = draft.tokens[:num_valid]
        x = np.asarray(logits[: num_valid + 1], dtype=np.float32)  # [n+1, V]
        greedy = is_greedy(req.params)
        if greedy:
            out = greedy_accept(tokens, [int(t) for t in np.argmax(biased(x, req.params), axis=-1)])
        else:
            q = draft.q[:num_valid] if draft.q is not None else None
            out = rejection_accept(tokens, q, processed_probs(x, req.params), _rng(req, _VERIFY_STREAM))
        accepted = len(out) - 1
        self.by_position["greedy" if greedy else "sampled"].record(len(tokens), accepted)
        self.num_drafts += 1
        self.target.proposed += len(draft.tokens)
        self.target.accepted += accepted
        req.spec_proposed += len(draft.tokens)
        req.spec_accepted += accepted
        self.controller.observe(req.request_id, len(draft.tokens), accepted)
        # Draft KV stays valid up to the last token that entered the sequence.
        self.drafter.settle(req.request_id, req.num_tokens + accepted)
        return [int(t) for t in out]

    def draft_tokens(self, request_id: str) -> list[int]:
        return self._drafts[request_id].tokens

    def forget(self, request_id: str) -> None:
        self._drafts.pop(request_id, None)
        self.controller.forget(request_id)
        self.drafter.forget(request_id)

    def stats(self) -> SpecStatsSnapshot:
        levels = [self.target]
        level: Proposer | None = self.drafter
        while isinstance(level, ModelDrafter) and level.sub is not None:
            levels.append(level.stats)
            level = level.sub
        return SpecStatsSnapshot(True, self.num_drafts, tuple(s.proposed for s in levels),
                                 tuple(s.accepted for s in levels), self.controller.last_speedup)


_DRAFT_STREAM, _VERIFY_STREAM = 1, 2


def _rng(req: Request, stream: int) -> np.random.Generator:
    """Per request, output position and use: a seeded request draws the same way alone or batched,
    and the draft's draws are independent of the acceptance tests (rejection sampling needs that)."""
    return np.random.default_rng([req.sample_seed & (2**63 - 1), len(req.output_token_ids), stream])


# -- start-up cost measurement --

def measure_costs(target, drafter: ModelDrafter, k: int, block_size: int, repeats: int = 5) -> SpecCosts:
    """Time target decode, target verification (k+1 tokens per row) and draft forwards at 1 and 8
    rows on scratch blocks (the pool is empty at start-up; nothing reads what this writes). The
    fastest of `repeats` rounds, the six measurements interleaved within each round: other work on
    the machine only ever adds time, and a burst of it (e.g. while the process next door loads)
    then inflates every measurement of a round instead of one kind (a decode measured 5x slow
    once made plain steps look dear and switched speculation on where it lost). A decode step is a
    verification with no drafts, so it is never costed above a verification of as many tokens."""
    def rows(n_rows, n_tokens):
        pages = -(-(32 + n_tokens) // block_size)
        return [ScheduledRow(f"_cost{r}", tuple([1] * n_tokens), 32, tuple(range(r * pages, (r + 1) * pages)),
                             sample=True, num_draft=n_tokens - 1) for r in range(n_rows)]

    cases = [(target, rows(1, 1)), (target, rows(8, 1)), (target, rows(1, k + 1)), (target, rows(8, k + 1)),
             (drafter.runner, rows(1, 1)), (drafter.runner, rows(8, 1))]
    for runner, batch in cases:
        mx.eval(runner.execute(batch)[0])  # warm-up
    best = [float("inf")] * len(cases)
    for _ in range(repeats):
        for i, (runner, batch) in enumerate(cases):
            start = time.perf_counter()
            mx.eval(runner.execute(batch)[0])
            best[i] = min(best[i], time.perf_counter() - start)
    d1, d8, v1, v8, r1, r8 = best
    verify = LinearCost.fit(k + 1, v1, 8 * (k + 1), v8)
    decode = LinearCost.fit(1, min(d1, verify(1)), 8, min(d8, verify(8)))
    draft = LinearCost.fit(1, r1, 8, r8)
    return SpecCosts(decode=decode, verify=verify, draft=draft)


def build_speculator(spec_cfg, loaded, target_runner, num_blocks: int, block_size: int,
                     max_model_len: int) -> Speculator:
    """The drafter chain from the config, its measured costs, and the controller."""
    from mlx_loom.spec.draft_model import (
        DRAFT_HEAD_BITS,
        DRAFT_KINDS,
        build_draft_model,
        load_draft_model,
    )
    from mlx_loom.spec.draft_scaling import ALPHAS, activation_scales

    def model_for(method: str):
        if method in DRAFT_KINDS:
            scales = activation_scales(loaded.model, loaded.tokenizer, ALPHAS[method])
            return build_draft_model(loaded.model, method, scales, head_bits=DRAFT_HEAD_BITS)
        return load_draft_model(method, loaded.vocab_size)

    sub: Proposer | None = None
    if spec_cfg.level2 == "ngram":
        sub = NgramLevel()
    elif spec_cfg.level2 not in ("none", None):
        sub = ModelDrafter(model_for(spec_cfg.level2), num_blocks, block_size, loaded.dtype)
    drafter = ModelDrafter(model_for(spec_cfg.method), num_blocks, block_size, loaded.dtype, sub=sub)
    controller = SpecController(k_max=spec_cfg.k, always=spec_cfg.mode == "always",
                                min_speedup=spec_cfg.min_speedup)
    if not controller.always:
        controller.costs = measure_costs(target_runner, drafter, spec_cfg.k, block_size)
    return Speculator(drafter, controller, max_model_len)
