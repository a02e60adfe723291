"""Property test over every accepted sampling value through the real sampler: each row always gets a
valid token id (never a masked one), and nothing raises. Bounds are SamplingParams' own (the API's)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlx_loom.sched.params import SamplingParams  # noqa: E402
from mlx_loom.sample.sampler import CANDIDATES, SamplingRow, sample  # noqa: E402

INT64 = 2**63


def _float(lo: float, hi: float, **kw):
    """Uniform values plus the edges and the tiny ones (subnormals round to 0 in float32)."""
    edges = [v for v in (lo, hi, 5e-324, 1e-300, 1e-50, 1e-8, 1e-5) if lo <= v <= hi]
    return st.one_of(st.floats(lo, hi, allow_nan=False, **kw), st.sampled_from(edges))


def _params(vocab: int):
    bias = st.lists(st.tuples(st.integers(0, vocab - 1), _float(-100.0, 100.0)), max_size=4)
    return st.builds(
        SamplingParams,
        max_tokens=st.just(8),
        temperature=_float(0.0, 100.0),
        top_p=_float(0.0, 1.0, exclude_min=True).filter(lambda v: v > 0),
        top_k=st.one_of(st.integers(-1, 3), st.integers(0, vocab + 5), st.just(2**40)),
        min_p=_float(0.0, 1.0),
        seed=st.one_of(st.none(), st.integers(-INT64, INT64 - 1)),
        presence_penalty=_float(-2.0, 2.0),
        frequency_penalty=_float(-2.0, 2.0),
        repetition_penalty=_float(0.1, 10.0),
        logit_bias=bias.map(lambda pairs: tuple(dict(pairs).items())),
        logprobs=st.booleans(),
        top_logprobs=st.integers(0, 20),
    )


def _logits(vocab: int):
    """Rows of ordinary, huge, flat or mostly masked logits (a grammar mask leaves a few tokens)."""
    kinds = st.sampled_from(["normal", "huge", "flat", "masked", "one"])
    return st.tuples(kinds, st.integers(0, 2**31 - 1))


def _row_logits(kind: str, seed: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 3, vocab).astype(np.float32)
    if kind == "huge":
        x *= 1e30
    elif kind == "flat":
        x[:] = 0.0
    elif kind in ("masked", "one"):
        keep = rng.choice(vocab, 1 if kind == "one" else min(5, vocab), replace=False)
        masked = np.full(vocab, -np.inf, np.float32)
        masked[keep] = x[keep]
        x = masked
    return x


@pytest.mark.parametrize("vocab", [7, CANDIDATES + 300])
def test_every_accepted_parameter_yields_a_valid_token(vocab):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows=st.lists(st.tuples(_params(vocab), _logits(vocab),
                                   st.lists(st.integers(0, vocab - 1), max_size=6)), min_size=1, max_size=4))
    def check(rows):
        x = np.stack([_row_logits(kind, seed, vocab) for _, (kind, seed), _ in rows])  # [B, V]
        batch = [SamplingRow(p, out[:2], out, seed=7) for p, _, out in rows]
        got = sample(mx.array(x), batch)
        assert len(got) == len(rows)
        for tok, row in zip(got, x):
            assert 0 <= tok.token_id < vocab and math.isfinite(float(row[tok.token_id])) or np.isinf(row).all()
            if tok.logprob is not None:
                assert not math.isnan(tok.logprob)

    check()
