"""Batched per-row sampling: one call per engine step over the logits of the rows that sample.

Per row, following vLLM v1 / OpenAI semantics:

1. ``logit_bias`` is added;
2. ``repetition_penalty`` over prompt + output tokens (HF rule: positive logits divided,
   negative multiplied);
3. ``presence_penalty`` / ``frequency_penalty`` over output tokens only:
   ``logit -= presence * (count > 0) + frequency * count``. This gives the *processed* logits.
4. Greedy rows (temperature < 1e-5, as vLLM, or top_k == 1) take the argmax of them.
5. Other rows divide by temperature, then apply top_k, top_p (the smallest set whose probability
   reaches top_p; the top token always stays), min_p (drop p < min_p * p_max), and draw from
   what is left, renormalized.

Logprobs are the log_softmax of the *processed* logits (step 3): after bias and penalties,
before temperature and truncation. vLLM calls this ``processed_logprobs``; its default,
``raw_logprobs``, would also skip bias and penalties.

Randomness: each sampled row draws one uniform ``u`` in [0, 1), hashed in Python from
``(row.seed, len(row.output_token_ids))`` alone, and takes the inverse CDF of its final
distribution at ``u``. Every array op is row-local (elementwise, or a reduction / scan / sort
along V), and which path a row takes depends only on that row, so a seeded row gives the same
token alone or at any position of any batch. One uniform per row instead of V Gumbel draws
keeps the draw to one cumsum and one compare, with no per-row MLX calls.

Cost on the CPU backend, where one sort of a 49k row takes ~5 ms and ``exp`` is 2-3x slower
than ``power(2, .)``: top_k / top_p rows never sort the whole row; they take the top
``CANDIDATES`` by argpartition and sort only those. A top_p row whose nucleus is wider than
that (very flat distribution: temperature >= 1.5, or top_p near 1) is redone with a full sort
after the single host sync, the only case that costs a second sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

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


def sample(logits: mx.array, rows: Sequence[SamplingRow]) -> list[SampledToken]:
    """Pick one token per row of logits [B, V] (any float dtype); one host sync in the usual case."""
    if not rows:
        return []
    x = logits.astype(mx.float32)  # [B, V]
    vocab = x.shape[-1]
    plan = _plan(rows, vocab)
    if len(plan.greedy) == len(rows) and not plan.adjusted and not plan.logprobs:
        return [SampledToken(t, None) for t in mx.argmax(x, axis=-1).tolist()]
    if plan.adjusted:
        x = _adjust(x, rows, plan.adjusted)
    return _Step(x, rows, plan).run()


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


def samples_on_device(p: SamplingParams, vocab: int) -> bool:
    """Whether the row's token is one device op on its logits (`device_tokens`): greedy, no bias,
    penalties or logprobs. Its next step can then be launched before the token is read."""
    greedy = p.temperature < GREEDY_EPS or _top_k(p, vocab) == 1
    return greedy and not p.logit_bias and not p.has_penalties and not p.wants_logprobs


def device_tokens(logits: mx.array) -> mx.array:
    """logits [B, V] float32 (as the runner returns them) -> [B] int32 argmax, left on the device:
    `sample`'s greedy rule for these rows."""
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


# ---------------------------------------------------------------------------- bias and penalties


def _adjust(x: mx.array, rows: Sequence[SamplingRow], which: list[int]) -> mx.array:
    """Bias, then repetition, then presence/frequency, written only at the touched cells."""
    vocab = x.shape[-1]
    cells = _cells(rows, which, vocab)
    if cells.keys.size == 0:
        return x
    b = mx.array(cells.keys // vocab, dtype=mx.int32)  # [N] batch row of each cell
    t = mx.array(cells.keys % vocab, dtype=mx.int32)  # [N] token of each cell
    v = x[b, t] + mx.array(cells.bias)  # [N]
    rp = mx.array(cells.rep)  # [N], 1.0 where the repetition penalty does not apply
    v = mx.where(v > 0, v / rp, v * rp) - mx.array(cells.pen)
    x[b, t] = v  # rebinds this handle only; the caller's logits are untouched
    return x


@dataclass(frozen=True)
class _Cells:
    """Unique (row, token) cells touched by bias or penalties, keyed row * V + token."""

    keys: np.ndarray  # [N] int64, sorted
    bias: np.ndarray  # [N] float32, summed logit_bias
    rep: np.ndarray  # [N] float32, repetition penalty (1.0 when not applicable)
    pen: np.ndarray  # [N] float32, presence * (count > 0) + frequency * count


class _Occurrences:
    """(cell key, value) pairs gathered row by row; ids outside the vocabulary are dropped."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self._keys: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []

    def add(self, row: int, tokens: Sequence[int] | np.ndarray, values: float | Sequence[float]) -> None:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        vals = np.broadcast_to(np.asarray(values, dtype=np.float64), ids.shape)
        ok = (ids >= 0) & (ids < self.vocab)  # an out-of-range id would land in the next row
        self._keys.append(row * self.vocab + ids[ok])
        self._vals.append(vals[ok])

    def keys(self) -> np.ndarray:
        return np.concatenate(self._keys) if self._keys else np.zeros(0, np.int64)

    def values(self) -> np.ndarray:
        return np.concatenate(self._vals) if self._vals else np.zeros(0, np.float64)

    def positions(self, cells: np.ndarray) -> np.ndarray:
        return np.searchsorted(cells, self.keys())


def _cells(rows: Sequence[SamplingRow], which: list[int], vocab: int) -> _Cells:
    bias, seen, pres, freq = (_Occurrences(vocab) for _ in range(4))
    for b in which:
        row, p = rows[b], rows[b].params
        if p.logit_bias:
            bias.add(b, [tok for tok, _ in p.logit_bias], [v for _, v in p.logit_bias])
        if p.repetition_penalty != 1.0:
            ids = np.concatenate([_ids(row.prompt_token_ids), _ids(row.output_token_ids)])
            seen.add(b, ids, p.repetition_penalty)
        if p.presence_penalty or p.frequency_penalty:
            out = _ids(row.output_token_ids)
            pres.add(b, out, p.presence_penalty)
            freq.add(b, out, p.frequency_penalty)
    keys = np.unique(np.concatenate([bias.keys(), seen.keys(), pres.keys()]))
    n = keys.size
    rep = np.ones(n, np.float32)
    rep[seen.positions(keys)] = seen.values()
    pen = np.zeros(n, np.float64)
    pen[pres.positions(keys)] = pres.values()  # repeated cells rewrite one value: presence once
    pen += np.bincount(freq.positions(keys), weights=freq.values(), minlength=n)  # freq * count
    summed_bias = np.bincount(bias.positions(keys), weights=bias.values(), minlength=n)
    return _Cells(keys, summed_bias.astype(np.float32), rep, pen.astype(np.float32))


def _ids(tokens: Sequence[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


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


def _group_params(rows: Sequence[SamplingRow], idx: list[int], m: int, vocab: int) -> _GroupParams:
    ps = [rows[b].params for b in idx]
    ks = [_top_k(p, vocab) for p in ps]
    return _GroupParams(
        scale=mx.array([_LOG2E / p.temperature for p in ps], dtype=mx.float32),
        top_k=mx.array([k or m for k in ks], dtype=mx.int32),
        has_k=mx.array([k > 0 for k in ks]),
        top_p=mx.array([p.top_p if p.top_p < 1.0 else math.inf for p in ps], dtype=mx.float32),
        min_p=mx.array([p.min_p for p in ps], dtype=mx.float32),
        u=mx.array([uniform(rows[b].seed, len(rows[b].output_token_ids)) for b in idx], dtype=mx.float32),
        any_min_p=any(p.min_p > 0.0 for p in ps),
        any_p_without_k=any(p.top_p < 1.0 and not k for p, k in zip(ps, ks)),
    )


class _Step:
    """Builds the lazy graph of one call, evaluates it once, and unpacks it per row."""

    def __init__(self, x: mx.array, rows: Sequence[SamplingRow], plan: _Plan) -> None:
        self.x, self.rows, self.plan = x, rows, plan  # x: [B, V] processed logits
        self.vocab = x.shape[-1]

    def run(self) -> list[SampledToken]:
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
        lp = self._logprobs(ids, order)
        mx.eval(ids, fits, *lp)  # the one host sync
        tokens = dict(zip(order, ids.tolist()))
        chosen = dict(zip(plan.logprobs, lp[1].tolist())) if plan.logprobs else {}
        self._redo_wide_nuclei([b for b, ok in zip(plan.cand, fits.tolist()) if not ok], tokens, chosen)
        return self._results(tokens, chosen, lp)

    def _take(self, idx: list[int]) -> mx.array:
        if idx == list(range(self.x.shape[0])):
            return self.x
        return self.x[mx.array(idx, dtype=mx.int32)]  # [S, V]

    def _params(self, idx: list[int], m: int) -> _GroupParams:
        return _group_params(self.rows, idx, m, self.vocab)

    def _logprobs(self, ids: mx.array, order: list[int]) -> tuple[mx.array, ...]:
        """(lse [L], x at chosen [L], top values [L, K], top ids [L, K]) of the logprob rows."""
        if not self.plan.logprobs:
            return ()
        pos = {b: i for i, b in enumerate(order)}
        tok = ids[mx.array([pos[b] for b in self.plan.logprobs], dtype=mx.int32)]  # [L]
        xl = self._take(self.plan.logprobs)  # [L, V]
        xmax = mx.max(xl, axis=-1, keepdims=True)  # [L, 1]
        lse = xmax[:, 0] + mx.log(mx.sum(_exp2((xl - xmax) * _LOG2E), axis=-1))  # [L]
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


def _exp2(a: mx.array) -> mx.array:
    # 2 ** a rather than exp: MLX's CPU exp is 2-3x slower than its power; same accuracy here.
    return mx.power(2.0, a)


def _draw_full(x: mx.array, g: _GroupParams) -> mx.array:
    """Token [S] from softmax(x / T) with min_p, by inverse CDF in vocabulary order."""
    xmax = mx.max(x, axis=-1, keepdims=True)  # [S, 1]
    p = _exp2((x - xmax) * g.scale[:, None])  # [S, V], 1.0 at the top token
    if g.any_min_p:
        p = p * (p >= g.min_p[:, None])  # p_max == 1, so this is p < min_p * p_max
    return _inverse_cdf(p, g.u)


def _draw_truncated(x: mx.array, g: _GroupParams, m: int) -> tuple[mx.array, mx.array]:
    """Token [S] after top_k / top_p / min_p over the top-m candidates, and whether it is exact.

    fits [S] is False for a top_p row (no top_k) whose nucleus reaches past the m candidates.
    """
    vocab = x.shape[-1]
    vals, idx = _top_sorted(x, m)  # [S, M] best first
    p = _exp2((vals - vals[:, :1]) * g.scale[:, None])  # [S, M], 1.0 at the top token
    p = p * (mx.arange(m)[None, :] < g.top_k[:, None])  # top_k
    c = mx.cumsum(p, axis=-1)  # [S, M]
    z = c[:, -1]  # [S] top-k mass, or the whole row's when m == V
    if g.any_p_without_k and m < vocab:
        z_row = mx.sum(_exp2((x - vals[:, :1]) * g.scale[:, None]), axis=-1)  # [S]
        z = mx.where(g.has_k, z, z_row)
    target = g.top_p * z  # [S]; inf when top_p is off
    before = mx.concatenate([mx.zeros_like(c[:, :1]), c[:, :-1]], axis=-1)  # [S, M] exclusive
    # top_p: keep until the mass before reaches target; the top token always stays, even where a tiny
    # top_p (below float32's smallest, e.g. 1e-50) makes the target 0.
    p = p * ((before < target[:, None]) | (mx.arange(m)[None, :] == 0))
    if g.any_min_p:
        p = p * (p >= g.min_p[:, None])
    fits = g.has_k | (c[:, -1] >= target) if m < vocab else mx.ones(g.has_k.shape, dtype=mx.bool_)
    j = _inverse_cdf(p, g.u)  # [S] position among the candidates
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


def _inverse_cdf(p: mx.array, u: mx.array) -> mx.array:
    """Index [S] where the cumsum of unnormalized p [S, N] first exceeds u * total.

    u <= 1 - 2**-24 makes u * total < total in float32, so the index is < N and has p > 0:
    a zeroed (excluded) token is never picked. Clamped to N - 1 all the same, so that no row (say,
    one whose every p is 0) can ever index past its candidates.
    """
    c = mx.cumsum(p, axis=-1)  # [S, N]
    t = u * c[:, -1]  # [S]
    return mx.minimum(mx.sum(c <= t[:, None], axis=-1), p.shape[-1] - 1)
