"""Batched per-row sampling: one graph per engine step over the logits of the rows that sample.

Per row, following vLLM v1 / OpenAI semantics:

1. ``logit_bias`` is added;
2. ``repetition_penalty`` over prompt + output tokens (HF rule: positive logits divided,
   negative multiplied);
3. ``presence_penalty`` / ``frequency_penalty`` over output tokens only:
   ``logit -= presence * (count > 0) + frequency * count``. This gives the *processed* logits
   (`penalties.py`, built on the device).
4. Greedy rows (temperature < 1e-5, as vLLM, or top_k == 1) take the argmax of them.
5. Other rows divide by temperature, then apply top_k, top_p (the smallest set whose probability
   reaches top_p; the top token always stays), min_p (drop p < min_p * p_max), and draw from
   what is left, renormalized.

Logprobs are the log_softmax of the *processed* logits (step 3): after bias and penalties,
before temperature and truncation. vLLM calls this ``processed_logprobs``; its default,
``raw_logprobs``, would also skip bias and penalties.

Everything is on the device: `sample_on_device` builds the graph and reads nothing, so the
engine can launch the next step from the sampled tokens (`DeviceSample.tokens`, batch order)
before the host sees them; `read` is the one host sync. `prev` is a token per row that the
previous step sampled and the host has not read: it counts in the penalties and moves the row's
output position by one, so a launched-ahead step samples exactly what a synchronous one would.

Randomness: each sampled row draws one uniform ``u`` in [0, 1), hashed in Python from
``(row.seed, output position)`` alone, and takes the inverse CDF of its final distribution at
``u``. Every array op is row-local (elementwise, or a reduction / scan / sort along V), and which
path a row takes depends only on that row, so a seeded row gives the same token alone or at any
position of any batch, pipelined or not.

Cost on the CPU backend, where one sort of a 49k row takes ~5 ms and ``exp`` is 2-3x slower
than ``power(2, .)``: top_k / top_p rows never sort the whole row; they take the top
``CANDIDATES`` by argpartition and sort only those. A top_p row whose nucleus is wider than
that (very flat distribution: temperature >= 1.5, or top_p near 1) is redone with a full sort
after the host sync (`read` reports it: a step launched from the first draw is then stale). Rows
with neither draw over the whole row through `kernels/inverse_cdf.py` (native on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx

from mlx_loom.kernels.inverse_cdf import draw_full, exp2, inverse_cdf
from mlx_loom.sample.penalties import PenaltyRow, adjust
from mlx_loom.sched.params import SamplingParams

CANDIDATES = 1024
"""M: tokens kept per top_k / top_p row before sorting (a nucleus wider than this is rare)."""
MAX_TOP_LOGPROBS = 20
"""Alternatives always computed when any row wants some, so a row's do not depend on the batch."""
GREEDY_EPS = 1e-5
"""Temperatures below this are greedy (vLLM's _SAMPLING_EPS); dividing by them overflows."""
_LOG2E = 1.4426950408889634
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    seed: int
    """Per-request base seed; the draw for output position n depends on (seed, n) only."""


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None
    """Log-probability of token_id under the processed logits; set when params.wants_logprobs."""
    top_logprobs: tuple[tuple[int, float], ...] = ()
    """(token id, logprob) best first, params.top_logprobs of them."""


@dataclass
class _Plan:
    """Row indices (into the batch) of each path; a row's path depends on its own params only."""

    greedy: list[int]
    full: list[int]  # sampled, no top_k / top_p: inverse CDF over the whole row
    cand: list[int]  # sampled with top_k <= M or top_p: over the top-M candidates
    wide: list[int]  # sampled with top_k > M: over the fully sorted row
    adjusted: list[int]  # logit_bias or penalties
    logprobs: list[int]


@dataclass(frozen=True)
class DeviceSample:
    """One step's draws, nothing read yet: `tokens` [B] int32 in batch order stays on the device."""

    tokens: mx.array
    x: mx.array  # [B, V] processed logits (for a redo)
    rows: Sequence[SamplingRow]
    plan: _Plan
    u: tuple[float, ...]  # per batch row, fixed when the graph was built
    fits: mx.array  # [C] bool per plan.cand row: False = nucleus wider than the candidates
    logprobs: tuple[mx.array, ...]  # (lse [L], x at token [L], top values [L, K], top ids [L, K]) or ()

    def arrays(self) -> list[mx.array]:
        """What to evaluate (async_eval) so that `read` only copies."""
        return [self.tokens, self.fits, *self.logprobs]


def sample(logits: mx.array, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Pick one token per row of logits [B, V] (any float dtype); one host sync in the usual case."""
    return read(sample_on_device(logits, rows))[0] if rows else []


def sample_on_device(logits: mx.array, rows: Sequence[SamplingRow], prev: mx.array | None = None) -> DeviceSample:
    """The lazy graph of one step's draws over logits [B, V]; nothing is evaluated or read.

    prev [B] int32: each row's previous token, sampled but not read yet (it follows the row's
    output_token_ids); None when the host knows every token."""
    x = logits.astype(mx.float32)  # [B, V]
    vocab = x.shape[-1]
    plan = _plan(rows, vocab)
    if len(plan.greedy) == len(rows) and not plan.adjusted and not plan.logprobs:
        return DeviceSample(device_tokens(x), x, rows, plan, (), mx.zeros((0,), dtype=mx.bool_), ())
    shift = 0 if prev is None else 1
    u = tuple(uniform(r.seed, len(r.output_token_ids) + shift) for r in rows)
    if plan.adjusted:
        x = _adjusted(x, rows, plan.adjusted, prev)
    return _Step(x, rows, plan, u).build()


def read(s: DeviceSample) -> tuple[list[SampledToken], list[int]]:
    """The host sync: the tokens (with logprobs where asked) and the batch rows that were redone
    (their first draw, `s.tokens`, was not the final token)."""
    if not s.plan.cand and not s.plan.logprobs and not s.plan.adjusted and len(s.plan.greedy) == len(s.rows):
        return [SampledToken(t, None) for t in s.tokens.tolist()], []
    return _Step(s.x, s.rows, s.plan, s.u).unpack(s)


def _adjusted(x: mx.array, rows: Sequence[SamplingRow], which: list[int], prev: mx.array | None) -> mx.array:
    prows = [PenaltyRow(rows[b].params, rows[b].prompt_token_ids, rows[b].output_token_ids) for b in which]
    if len(which) == x.shape[0]:
        return adjust(x, prows, prev)
    idx = mx.array(which, dtype=mx.int32)
    x[idx] = adjust(x[idx], prows, None if prev is None else prev[idx])  # rebinds this handle only
    return x


def _plan(rows: Sequence[SamplingRow], vocab: int) -> _Plan:
    plan = _Plan([], [], [], [], [], [])
    m = min(CANDIDATES, vocab)
    for b, row in enumerate(rows):
        p = row.params
        k = _top_k(p, vocab)
        if p.temperature < GREEDY_EPS or k == 1:
            plan.greedy.append(b)
        elif k > m:
            plan.wide.append(b)
        elif k or p.top_p < 1.0:
            plan.cand.append(b)
        else:
            plan.full.append(b)
        if p.logit_bias or p.has_penalties:
            plan.adjusted.append(b)
        if p.wants_logprobs:
            plan.logprobs.append(b)
    return plan


def device_tokens(logits: mx.array) -> mx.array:
    """logits [B, V] float32 (as the runner returns them) -> [B] int32 argmax, left on the device:
    `sample`'s greedy rule."""
    return mx.argmax(logits, axis=-1).astype(mx.int32)


def _top_k(p: SamplingParams, vocab: int) -> int:
    """Effective top_k: 0 when it keeps the whole vocabulary."""
    return p.top_k if 0 < p.top_k < vocab else 0


def uniform(seed: int, step: int) -> float:
    """The row's uniform in [0, 1) for output position `step`: splitmix64 of (seed, step), 24 bits.

    24 bits so the value is exact in float32, and u * total < total always holds in float32.
    """
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)


# ---------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class _GroupParams:
    """Per-row sampling parameters of one path's rows, as [S] arrays."""

    scale: mx.array  # [S] log2(e) / temperature: p = 2 ** ((x - max) * scale)
    top_k: mx.array  # [S] int32; M (keep every candidate) when off
    has_k: mx.array  # [S] bool
    top_p: mx.array  # [S] float32; inf when off
    min_p: mx.array  # [S] float32
    u: mx.array  # [S] float32 uniform in [0, 1)
    any_min_p: bool
    any_p_without_k: bool  # such rows need the normalizer over the whole row


def _group_params(rows: Sequence[SamplingRow], u: Sequence[float], idx: list[int], m: int,
                  vocab: int) -> _GroupParams:
    ps = [rows[b].params for b in idx]
    ks = [_top_k(p, vocab) for p in ps]
    return _GroupParams(
        scale=mx.array([_LOG2E / p.temperature for p in ps], dtype=mx.float32),
        top_k=mx.array([k or m for k in ks], dtype=mx.int32),
        has_k=mx.array([k > 0 for k in ks]),
        top_p=mx.array([p.top_p if p.top_p < 1.0 else math.inf for p in ps], dtype=mx.float32),
        min_p=mx.array([p.min_p for p in ps], dtype=mx.float32),
        u=mx.array([u[b] for b in idx], dtype=mx.float32),
        any_min_p=any(p.min_p > 0.0 for p in ps),
        any_p_without_k=any(p.top_p < 1.0 and not k for p, k in zip(ps, ks)),
    )


class _Step:
    """Builds the lazy graph of one step (`build`), and unpacks it per row after the sync (`unpack`)."""

    def __init__(self, x: mx.array, rows: Sequence[SamplingRow], plan: _Plan, u: Sequence[float]) -> None:
        self.x, self.rows, self.plan, self.u = x, rows, plan, u  # x: [B, V] processed logits
        self.vocab = x.shape[-1]

    def build(self) -> DeviceSample:
        plan, vocab = self.plan, self.vocab
        order = plan.greedy + plan.full + plan.cand + plan.wide  # batch rows, in `ids` order
        parts, fits = [], mx.zeros((0,), dtype=mx.bool_)
        if plan.greedy:
            parts.append(mx.argmax(self._take(plan.greedy), axis=-1))
        if plan.full:
            parts.append(_draw_full(self._take(plan.full), self._params(plan.full, vocab)))
        if plan.cand:
            m = min(CANDIDATES, vocab)
            tok, fits = _draw_truncated(self._take(plan.cand), self._params(plan.cand, m), m)
            parts.append(tok)
        if plan.wide:
            parts.append(_draw_truncated(self._take(plan.wide), self._params(plan.wide, vocab), vocab)[0])
        ids = mx.concatenate([p.astype(mx.int32) for p in parts])  # [B] in `order`
        if order != list(range(len(order))):
            back = [0] * len(order)
            for i, b in enumerate(order):
                back[b] = i
            ids = ids[mx.array(back, dtype=mx.int32)]  # [B] in batch order
        return DeviceSample(ids, self.x, self.rows, plan, tuple(self.u), fits, self._logprobs(ids))

    def unpack(self, s: DeviceSample) -> tuple[list[SampledToken], list[int]]:
        plan = self.plan
        mx.eval(*s.arrays())
        tokens = dict(enumerate(s.tokens.tolist()))
        chosen = dict(zip(plan.logprobs, s.logprobs[1].tolist())) if plan.logprobs else {}
        redo = [b for b, ok in zip(plan.cand, s.fits.tolist()) if not ok]
        self._redo_wide_nuclei(redo, tokens, chosen)
        return self._results(tokens, chosen, s.logprobs), redo

    def _take(self, idx: list[int]) -> mx.array:
        if idx == list(range(self.x.shape[0])):
            return self.x
        return self.x[mx.array(idx, dtype=mx.int32)]  # [S, V]

    def _params(self, idx: list[int], m: int) -> _GroupParams:
        return _group_params(self.rows, self.u, idx, m, self.vocab)

    def _logprobs(self, ids: mx.array) -> tuple[mx.array, ...]:
        """(lse [L], x at chosen [L], top values [L, K], top ids [L, K]) of the logprob rows."""
        if not self.plan.logprobs:
            return ()
        tok = ids[mx.array(self.plan.logprobs, dtype=mx.int32)]  # [L]
        xl = self._take(self.plan.logprobs)  # [L, V]
        xmax = mx.max(xl, axis=-1, keepdims=True)  # [L, 1]
        lse = xmax[:, 0] + mx.log(mx.sum(exp2((xl - xmax) * _LOG2E), axis=-1))  # [L]
        at_tok = mx.take_along_axis(xl, tok[:, None], axis=-1)[:, 0]  # [L]
        k = min(MAX_TOP_LOGPROBS, self.vocab)
        if not any(self.rows[b].params.top_logprobs for b in self.plan.logprobs):
            k = 0
        vals, idx = _top_sorted(xl, k) if k else (mx.zeros((0,)), mx.zeros((0,), dtype=mx.uint32))
        return lse, at_tok, vals, idx

    def _redo_wide_nuclei(self, redo: list[int], tokens: dict[int, int], chosen: dict[int, float]) -> None:
        """Rows whose top_p nucleus outgrew the candidates: sort the whole row (second sync)."""
        if not redo:
            return
        x = self._take(redo)  # [R, V]
        tok, _ = _draw_truncated(x, self._params(redo, self.vocab), self.vocab)
        at_tok = mx.take_along_axis(x, tok[:, None].astype(mx.int32), axis=-1)[:, 0]  # [R]
        mx.eval(tok, at_tok)
        for b, t, v in zip(redo, tok.tolist(), at_tok.tolist()):
            tokens[b] = t
            if b in chosen:
                chosen[b] = v

    def _results(self, tokens: dict[int, int], chosen: dict[int, float], lp: tuple) -> list[SampledToken]:
        out = [SampledToken(tokens[b], None) for b in range(len(self.rows))]
        if not self.plan.logprobs:
            return out
        lse, vals, idx = lp[0].tolist(), lp[2].tolist(), lp[3].tolist()
        for i, b in enumerate(self.plan.logprobs):
            n = min(self.rows[b].params.top_logprobs, self.vocab)  # a vocabulary smaller than 20
            top = tuple((idx[i][j], vals[i][j] - lse[i]) for j in range(n))
            out[b] = SampledToken(tokens[b], chosen[b] - lse[i], top)
        return out


# ---------------------------------------------------------------------------- array kernels


def _draw_full(x: mx.array, g: _GroupParams) -> mx.array:
    """Token [S] from softmax(x / T) with min_p, by inverse CDF in vocabulary order."""
    return draw_full(x, g.scale, g.min_p, g.u, g.any_min_p)


def _draw_truncated(x: mx.array, g: _GroupParams, m: int) -> tuple[mx.array, mx.array]:
    """Token [S] after top_k / top_p / min_p over the top-m candidates, and whether it is exact.

    fits [S] is False for a top_p row (no top_k) whose nucleus reaches past the m candidates.
    """
    vocab = x.shape[-1]
    vals, idx = _top_sorted(x, m)  # [S, M] best first
    p = exp2((vals - vals[:, :1]) * g.scale[:, None])  # [S, M], 1.0 at the top token
    p = p * (mx.arange(m)[None, :] < g.top_k[:, None])  # top_k
    c = mx.cumsum(p, axis=-1)  # [S, M]
    z = c[:, -1]  # [S] top-k mass, or the whole row's when m == V
    if g.any_p_without_k and m < vocab:
        z_row = mx.sum(exp2((x - vals[:, :1]) * g.scale[:, None]), axis=-1)  # [S]
        z = mx.where(g.has_k, z, z_row)
    target = g.top_p * z  # [S]; inf when top_p is off
    before = mx.concatenate([mx.zeros_like(c[:, :1]), c[:, :-1]], axis=-1)  # [S, M] exclusive
    # top_p: keep until the mass before reaches target; the top token always stays, even where a tiny
    # top_p (below float32's smallest, e.g. 1e-50) makes the target 0.
    p = p * ((before < target[:, None]) | (mx.arange(m)[None, :] == 0))
    if g.any_min_p:
        p = p * (p >= g.min_p[:, None])
    fits = g.has_k | (c[:, -1] >= target) if m < vocab else mx.ones(g.has_k.shape, dtype=mx.bool_)
    j = inverse_cdf(p, g.u)  # [S] position among the candidates
    return mx.take_along_axis(idx, j[:, None], axis=-1)[:, 0], fits


def _top_sorted(x: mx.array, m: int) -> tuple[mx.array, mx.array]:
    """The m largest values [S, M] of each row and their ids, best first (argpartition if m < V)."""
    vocab = x.shape[-1]
    if m >= vocab:
        idx = mx.argsort(-x, axis=-1)  # [S, V]
        return mx.take_along_axis(x, idx, axis=-1), idx
    idx = mx.argpartition(x, kth=vocab - m, axis=-1)[:, vocab - m :]  # [S, M] unordered
    vals = mx.take_along_axis(x, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)  # [S, M]
    return mx.take_along_axis(vals, order, axis=-1), mx.take_along_axis(idx, order, axis=-1)
