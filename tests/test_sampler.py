"""mlx_loom.sample.sampler against numpy references (float64) on random logits."""

from __future__ import annotations

import numpy as np
import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_loom.sched.params import SamplingParams
from mlx_loom.sample.sampler import CANDIDATES, SamplingRow, sample, uniform

V_SMALL = 64
V_BIG = 49152


def _row(seed: int = 0, prompt=(1, 2, 3), output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), tuple(prompt), tuple(output), seed)


def _logits(b: int, v: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((b, v)) * scale).astype(np.float32)


def _ids(logits: np.ndarray, rows) -> list[int]:
    return [t.token_id for t in sample(mx.array(logits), rows)]


# ---------------------------------------------------------------------------- numpy references


def ref_processed(x: np.ndarray, row: SamplingRow) -> np.ndarray:
    """Bias, repetition (prompt + output), presence/frequency (output), in float64."""
    p, x = row.params, x.astype(np.float64).copy()
    for tok, bias in p.logit_bias:
        if 0 <= tok < x.size:  # the sampler ignores ids outside the vocabulary
            x[tok] += bias
    if p.repetition_penalty != 1.0:
        seen = sorted(set(row.prompt_token_ids) | set(row.output_token_ids))
        x[seen] = np.where(x[seen] > 0, x[seen] / p.repetition_penalty, x[seen] * p.repetition_penalty)
    counts = np.bincount(np.asarray(row.output_token_ids, dtype=np.int64), minlength=x.size)
    return x - p.presence_penalty * (counts > 0) - p.frequency_penalty * counts


def ref_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def ref_probs(x: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Final sampling distribution: temperature, top_k, top_p, min_p, renormalized."""
    s = x.astype(np.float64) / p.temperature
    probs = np.exp(s - s.max())
    if 0 < p.top_k < s.size:
        probs[s < np.sort(s)[-p.top_k]] = 0.0
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        probs[order[before >= p.top_p]] = 0.0
    if p.min_p > 0.0:
        probs[probs < p.min_p * probs.max()] = 0.0
    return probs / probs.sum()


# ---------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_small_and_big_and_any_dtype():
    for v in (V_SMALL, V_BIG):
        x = _logits(8, v, seed=v)
        assert _ids(x, [_row(temperature=0.0)] * 8) == x.argmax(-1).tolist()
    x = _logits(4, V_SMALL, seed=1)
    xb = mx.array(x).astype(mx.bfloat16)
    expected = np.array(xb.astype(mx.float32)).argmax(-1).tolist()
    got = [t.token_id for t in sample(xb, [_row(temperature=0.0)] * 4)]
    assert got == expected
    assert sample(mx.array(x), []) == []


def test_greedy_ignores_truncation_and_top_k_1_is_greedy():
    x = _logits(6, V_SMALL, seed=2)
    rows = [_row(seed=s, temperature=0.0, top_p=0.5, top_k=3) for s in range(3)]
    rows += [_row(seed=s, temperature=1.3, top_k=1) for s in range(3)]
    assert _ids(x, rows) == x.argmax(-1).tolist()


# ---------------------------------------------------------------------------- reproducibility


MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.9),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.1, top_k=7),
    dict(temperature=1.0, min_p=0.05, presence_penalty=0.4),
    dict(temperature=0.8, top_k=20, top_p=0.8, logprobs=True, top_logprobs=3),
    dict(temperature=0.0, repetition_penalty=1.2, logprobs=True),
    dict(temperature=1.5, frequency_penalty=0.7, logit_bias=((5, 3.0),)),
]


@pytest.mark.parametrize("v", [V_SMALL, V_BIG])
def test_seeded_row_same_alone_and_at_row_3_of_mixed_batch(v):
    x = _logits(8, v, seed=3)
    for case, params in enumerate(MIXED):
        for seed, output in ((11, ()), (12, (4, 4, 9)), (13 + case, (1,) * case)):
            target = _row(seed=seed, output=output, **params)
            alone = sample(mx.array(x[3:4]), [target])[0]
            others = [_row(seed=100 + i, output=(i,), **MIXED[(case + i) % len(MIXED)]) for i in range(8)]
            batch = sample(mx.array(x), others[:3] + [target] + others[4:])[3]
            assert batch == alone, (params, seed)


def test_different_seeds_or_steps_give_different_tokens():
    x = np.repeat(_logits(1, V_SMALL, seed=4, scale=0.5), 40, axis=0)
    by_seed = _ids(x, [_row(seed=s, temperature=1.0) for s in range(40)])
    assert len(set(by_seed)) > 10
    by_step = _ids(x, [_row(seed=7, output=(0,) * n, temperature=1.0) for n in range(40)])
    assert len(set(by_step)) > 10
    assert len({uniform(7, n) for n in range(1000)}) == 1000
    assert all(0.0 <= uniform(s, n) < 1.0 for s in range(50) for n in range(50))


# ---------------------------------------------------------------------------- truncation and frequencies

TRUNCATIONS = [
    dict(temperature=1.0),
    dict(temperature=0.8, top_k=5),
    dict(temperature=1.0, top_p=0.7),
    dict(temperature=1.2, min_p=0.1),
    dict(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("params", TRUNCATIONS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_truncation_never_picks_excluded_and_matches_distribution(params):
    n = 6000
    x = _logits(1, V_SMALL, seed=5, scale=1.2)
    probs = ref_probs(x[0], SamplingParams(**params))
    rows = [_row(seed=s, output=(0,) * (s % 3), **params) for s in range(n)]
    ids = np.array(_ids(np.repeat(x, n, axis=0), rows))
    assert np.all(probs[ids] > 0), "sampled a token that truncation excludes"
    counts = np.bincount(ids, minlength=V_SMALL)
    expected = probs * n
    big = expected >= 5
    chi2 = float((((counts - expected) ** 2)[big] / expected[big]).sum())
    df = max(int(big.sum()) - 1, 1)
    assert chi2 < df + 6 * np.sqrt(2 * df), (chi2, df)


def test_top_p_nucleus_wider_than_candidates_uses_full_sort():
    # A flat row: the 0.95 nucleus holds far more than CANDIDATES tokens.
    x = _logits(4, V_BIG, seed=6, scale=0.3)
    params = dict(temperature=1.0, top_p=0.95)
    probs = [ref_probs(x[i], SamplingParams(**params)) for i in range(4)]
    assert (probs[0] > 0).sum() > CANDIDATES
    rows = [_row(seed=s, **params) for s in range(4)]
    ids = _ids(x, rows)
    assert all(probs[i][t] > 0 for i, t in enumerate(ids))
    alone = _ids(x[2:3], rows[2:3])
    assert alone == ids[2:3]


def test_top_k_above_candidates_and_big_vocab_truncation():
    x = _logits(3, V_BIG, seed=7, scale=3.0)
    rows = [
        _row(seed=1, temperature=1.0, top_k=CANDIDATES + 500),
        _row(seed=2, temperature=0.7, top_p=0.9),
        _row(seed=3, temperature=1.0, top_k=40, min_p=0.2),
    ]
    ids = _ids(x, rows)
    for i, row in enumerate(rows):
        assert ref_probs(x[i], row.params)[ids[i]] > 0


# ---------------------------------------------------------------------------- bias, penalties, logprobs


def _processed_via_logprobs(x: np.ndarray, row: SamplingRow) -> np.ndarray:
    """The sampler's log_softmax of its processed logits, read back through top_logprobs."""
    got = sample(mx.array(x[None]), [row])[0]
    assert len(got.top_logprobs) == x.size
    out = np.full(x.size, np.nan)
    for tok, lp in got.top_logprobs:
        out[tok] = lp
    return out


PROCESSING = [
    dict(logit_bias=((3, 5.0), (7, -100.0), (15, 0.5))),
    dict(repetition_penalty=1.7),
    dict(repetition_penalty=0.6),
    dict(presence_penalty=1.5),
    dict(frequency_penalty=-0.8),
    dict(presence_penalty=0.5, frequency_penalty=0.9, repetition_penalty=1.3, logit_bias=((4, 2.0),)),
]


@pytest.mark.parametrize("params", PROCESSING, ids=lambda p: ",".join(p))
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bias_and_penalties_match_reference(params, temperature):
    v = 16  # top_logprobs (<= 20) then covers the whole vocabulary
    x = _logits(1, v, seed=8, scale=3.0)[0]
    row = _row(seed=1, prompt=(1, 2, 2, 9), output=(4, 4, 4, 2, 11, 1), temperature=temperature,
               logprobs=True, top_logprobs=v, **params)
    expected = ref_log_softmax(ref_processed(x, row))
    np.testing.assert_allclose(_processed_via_logprobs(x, row), expected, atol=2e-5)
    if temperature == 0.0:
        assert _ids(x[None], [row]) == [int(np.argmax(expected))]


def test_penalties_leave_input_untouched_and_skip_out_of_range_ids():
    x = _logits(2, V_SMALL, seed=9)
    xm = mx.array(x)
    rows = [_row(output=(1, 1), temperature=0.0, frequency_penalty=2.0, logit_bias=((V_SMALL + 3, 50.0),)),
            _row(output=(5,), temperature=0.0, presence_penalty=2.0)]
    ids = [t.token_id for t in sample(xm, rows)]
    np.testing.assert_array_equal(np.array(xm), x)
    assert ids == [int(np.argmax(ref_processed(x[i], r))) for i, r in enumerate(rows)]


@pytest.mark.parametrize("v", [V_SMALL, V_BIG])
def test_logprobs_match_log_softmax_and_top_sorted(v):
    x = _logits(4, v, seed=10, scale=3.0)
    rows = [
        _row(seed=1, temperature=0.0, logprobs=True),
        _row(seed=2, temperature=0.7, top_p=0.9, logprobs=True, top_logprobs=5),
        _row(seed=3, temperature=1.0, top_logprobs=20, presence_penalty=1.0, output=(3, 8)),
        _row(seed=4, temperature=1.0),
    ]
    out = sample(mx.array(x), rows)
    for i, (row, got) in enumerate(zip(rows, out)):
        if not row.params.wants_logprobs:
            assert got.logprob is None and got.top_logprobs == ()
            continue
        ref = ref_log_softmax(ref_processed(x[i], row))
        assert got.logprob == pytest.approx(ref[got.token_id], abs=1e-4)
        assert len(got.top_logprobs) == row.params.top_logprobs
        lps = [lp for _, lp in got.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        best = np.argsort(-ref)[: len(lps)]
        assert [t for t, _ in got.top_logprobs] == best.tolist()
        np.testing.assert_allclose(lps, ref[best], atol=1e-4)


@pytest.mark.parametrize("v", [V_SMALL, V_BIG])
@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"min_p": 0.5}])
def test_top_p_below_float32_keeps_the_top_token(v, extra):
    """top_p = 1e-50 (accepted: > 0) is 0 in float32; the nucleus is then the top token alone,
    never an empty set that indexed past the candidates (a crash in the server)."""
    x = _logits(3, v, seed=9)
    rows = [_row(seed=s, temperature=1.0, top_p=1e-50, **extra) for s in range(3)]
    assert _ids(x, rows) == [int(i) for i in x.argmax(axis=-1)]


@pytest.mark.parametrize("params", [*PROCESSING, dict(top_p=0.9, logprobs=True, top_logprobs=3), dict(top_k=7)],
                         ids=lambda p: ",".join(p))
def test_a_previous_token_on_the_device_counts_as_if_known(params):
    """sample_on_device(prev=t) over a row's known output equals sampling with t appended on the host:
    what makes a step launched from unread tokens draw what a synchronous one would."""
    from mlx_loom.sample.sampler import read, sample_on_device

    x = _logits(3, V_BIG, seed=12, scale=3.0)
    outputs = [(4, 4, 9), (), (7,)]
    prev = [4, 11, 7]
    known = [_row(seed=s, prompt=(1, 2), output=o + (t,), temperature=0.8, **params)
             for s, (o, t) in enumerate(zip(outputs, prev))]
    pending = [_row(seed=s, prompt=(1, 2), output=o, temperature=0.8, **params) for s, o in enumerate(outputs)]
    want = sample(mx.array(x), known)
    got, redone = read(sample_on_device(mx.array(x), pending, mx.array(prev, dtype=mx.int32)))
    assert got == want and redone == []


def test_device_tokens_are_in_batch_order_for_mixed_paths():
    """The tokens a next step is launched from (DeviceSample.tokens) are row b's token at b, whatever
    path each row takes (greedy, full, candidates, wide), and equal what `read` returns."""
    from mlx_loom.sample.sampler import read, sample_on_device

    x = _logits(5, V_BIG, seed=13, scale=4.0)
    rows = [_row(seed=1, temperature=0.9, top_k=5), _row(temperature=0.0), _row(seed=2, temperature=0.7),
            _row(seed=3, temperature=1.0, top_k=CANDIDATES + 7), _row(seed=4, temperature=0.0, logprobs=True)]
    drawn = sample_on_device(mx.array(x), rows)
    got, redone = read(drawn)
    assert redone == [] and drawn.tokens.tolist() == [t.token_id for t in got]
    assert got[1].token_id == int(x[1].argmax()) and got[4].token_id == int(x[4].argmax())
