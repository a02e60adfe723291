"""Logit bias and repetition / presence / frequency penalties, built on the device.

The host hands over only the rows' known token ids (flat, with their row) and per-row scalars;
the dense [A, V] counts are scatter-added on the device, where a token sampled by the previous
step and not read yet (`prev`) is added like any other. So a row gets the same processed logits
whether its last token is known to the host (a synchronous step) or still on the device (a step
launched ahead): counts are small integers, exact in float32, and every op is row-local.

Per row (vLLM v1 / OpenAI order): ``v = x + bias``; where the token was seen (prompt + output),
``v = v / rp`` if positive else ``v * rp``; then ``v -= presence * (count > 0) + frequency * count``
over output tokens. Untouched cells come out bit-identical (``+ 0``, ``/ 1``, ``- 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import numpy as np

from mlx_loom.sched.params import SamplingParams


@dataclass(frozen=True)
class PenaltyRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


class _Flat:
    """Flat cell keys a * V + id over the adjusted rows; ids outside the vocabulary are dropped."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.keys, self.vals = vocab, [], []

    def add(self, a: int, tokens: Sequence[int] | np.ndarray, values: float | Sequence[float] = 1.0) -> None:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        vals = np.broadcast_to(np.asarray(values, dtype=np.float32), ids.shape)
        ok = (ids >= 0) & (ids < self.vocab)  # an out-of-range id would land in the next row
        self.keys.append(a * self.vocab + ids[ok])
        self.vals.append(vals[ok])

    def dense(self, rows: int, prev_keys: mx.array | None) -> mx.array:
        """[rows, V] float32 sums of the values at their cells, plus 1 at each prev cell."""
        out = mx.zeros((rows * self.vocab,), dtype=mx.float32)
        if self.keys:
            keys = np.concatenate(self.keys)
            if keys.size:
                out = out.at[mx.array(keys.astype(np.int32))].add(mx.array(np.concatenate(self.vals)))
        if prev_keys is not None:
            out = out.at[prev_keys].add(mx.ones(prev_keys.shape, dtype=mx.float32))
        return out.reshape(rows, self.vocab)


def adjust(x: mx.array, rows: Sequence[PenaltyRow], prev: mx.array | None) -> mx.array:
    """Processed logits [A, V] of x [A, V] float32 (the adjusted rows only).

    prev [A] int32: a token each row sampled after its known output (still on the device), or None."""
    count, vocab = len(rows), x.shape[-1]
    ps = [r.params for r in rows]
    prev_keys = None
    if prev is not None:
        prev_keys = mx.arange(count, dtype=mx.int32) * vocab + prev.astype(mx.int32)  # [A]
    if any(p.logit_bias for p in ps):
        bias = _Flat(vocab)
        for a, p in enumerate(ps):
            if p.logit_bias:
                bias.add(a, [t for t, _ in p.logit_bias], [b for _, b in p.logit_bias])
        x = x + bias.dense(count, None)
    if any(p.repetition_penalty != 1.0 for p in ps):
        seen = _Flat(vocab)
        for a, r in enumerate(rows):
            if r.params.repetition_penalty != 1.0:
                seen.add(a, r.prompt_token_ids)
                seen.add(a, r.output_token_ids)
        rp = _column([p.repetition_penalty for p in ps])
        x = mx.where(seen.dense(count, prev_keys) > 0, mx.where(x > 0, x / rp, x * rp), x)
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        out = _Flat(vocab)
        for a, r in enumerate(rows):
            if r.params.presence_penalty or r.params.frequency_penalty:
                out.add(a, r.output_token_ids)
        n = out.dense(count, prev_keys)  # [A, V] output counts
        x = x - (_column([p.presence_penalty for p in ps]) * (n > 0) + _column([p.frequency_penalty for p in ps]) * n)
    return x


def _column(values: list[float]) -> mx.array:
    return mx.array(values, dtype=mx.float32)[:, None]  # [A, 1]
