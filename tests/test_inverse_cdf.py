"""The sampler's inverse-CDF draw (mlx_loom/kernels/inverse_cdf.py): the native primitive against the
pure-MLX reference, its distribution, and the rows no draw may ever pick (masked, below min_p)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402

from mlx_loom.kernels import qmm  # noqa: E402
from mlx_loom.kernels.inverse_cdf import draw_full, draw_full_reference  # noqa: E402

LOG2E = 1.4426950408889634
native = pytest.mark.skipif(not qmm.native_available(), reason="native kernels not built")


def _rows(rng, s: int, v: int, temperature: float = 0.7, min_p: float = 0.0):
    x = mx.array((rng.standard_normal((s, v)) * 4).astype(np.float32))
    scale = mx.array(np.full(s, LOG2E / temperature, np.float32))
    return x, scale, mx.array(np.full(s, min_p, np.float32))


@native
def test_native_draw_matches_the_reference_but_for_rounding_at_token_boundaries():
    n = qmm.native_module()
    rng = np.random.default_rng(0)
    x, scale, min_p = _rows(rng, 32, 49152)
    same = total = 0
    for _ in range(10):
        u = mx.array(rng.random(32).astype(np.float32))
        got, ref = n.inverse_cdf_sample(x, scale, min_p, u), draw_full_reference(x, scale, min_p, u, False)
        same += int(mx.sum(got == ref).item())
        total += 32
    assert same >= 0.98 * total, (same, total)
    # a peaked row (one token holds nearly all the mass) draws it for every u but the extreme tail
    peaked = mx.array(np.r_[np.zeros(1000, np.float32), [40.0]][None, :])
    u = mx.array([0.5], dtype=mx.float32)
    assert n.inverse_cdf_sample(peaked, scale[:1], min_p[:1], u).item() == 1000


@native
def test_native_draw_follows_softmax():
    """Chi-square of 20000 draws over a 7-token row (odd size: vector lanes and a scalar tail)."""
    n = qmm.native_module()
    rng = np.random.default_rng(1)
    logits = np.array([1.0, 0.5, -0.3, 2.0, 0.0, -1.0, 1.5], np.float32)
    draws = 20000
    x = mx.array(np.tile(logits, (draws, 1)))
    u = mx.array(rng.random(draws).astype(np.float32))
    scale, min_p = mx.full((draws,), LOG2E / 0.9), mx.zeros((draws,))
    counts = np.bincount(np.array(n.inverse_cdf_sample(x, scale, min_p, u)), minlength=7)
    p = np.exp(logits / 0.9)
    p /= p.sum()
    chi2 = float((((counts - draws * p) ** 2) / (draws * p)).sum())
    assert chi2 < 22.5, (chi2, counts)  # p < 0.001 for 6 degrees of freedom


@native
@pytest.mark.parametrize("v", [1, 7, 256, 257, 49152])
def test_native_draw_never_picks_a_masked_token_or_one_below_min_p(v):
    n = qmm.native_module()
    rng = np.random.default_rng(v)
    x, scale, _ = _rows(rng, 16, v)
    keep = rng.random((16, v)) < 0.01
    keep[np.arange(16), rng.integers(0, v, 16)] = True  # at least one allowed token per row
    xm = mx.where(mx.array(keep), x, -mx.inf)
    min_p = mx.array(np.linspace(0.0, 0.9, 16).astype(np.float32))
    xn = np.array(xm)
    for _ in range(50):
        u = mx.array(np.r_[rng.random(14), 0.0, 1.0 - 2.0**-24].astype(np.float32))
        tok = np.array(n.inverse_cdf_sample(xm, scale, min_p, u))
        chosen = xn[np.arange(16), tok]
        assert np.isfinite(chosen).all()
        rowmax = xn.max(axis=1)
        p = np.exp2((chosen - rowmax) * np.array(scale))
        assert (p >= np.array(min_p) * (1 - 1e-5)).all()


@native
def test_native_draw_stays_in_range_on_degenerate_rows():
    n = qmm.native_module()
    x = mx.array([[-math.inf] * 5, [math.nan] * 5, [0.0, math.nan, 1.0, -math.inf, math.inf]], dtype=mx.float32)
    ones = mx.ones((3,))
    tok = np.array(n.inverse_cdf_sample(x, ones, mx.zeros((3,)), mx.full((3,), 0.5)))
    assert ((0 <= tok) & (tok < 5)).all()
    strided = mx.array(np.arange(12, dtype=np.float32).reshape(3, 4)).T  # [4, 3], not row-contiguous
    tok = np.array(n.inverse_cdf_sample(strided, mx.ones((4,)) * 50, mx.zeros((4,)), mx.full((4,), 0.5)))
    assert tok.tolist() == [2, 2, 2, 2]  # scale 50: the top token holds all the mass


@native
def test_native_draw_rejects_bad_shapes_and_dtypes():
    n = qmm.native_module()
    ok = mx.zeros((2,))
    with pytest.raises(ValueError, match="inverse_cdf_sample"):
        n.inverse_cdf_sample(mx.zeros((2, 4), dtype=mx.float16), ok, ok, ok)
    with pytest.raises(ValueError, match="inverse_cdf_sample"):
        n.inverse_cdf_sample(mx.zeros((2, 4)), mx.zeros((3,)), ok, ok)


def test_draw_full_dispatch_agrees_with_the_reference_on_a_clear_winner():
    """Whichever path runs here (native on the CPU, else the reference), a row whose top token holds
    all but 1e-9 of the mass draws it."""
    x = mx.array(np.r_[np.zeros(300, np.float32), [60.0], np.zeros(10, np.float32)][None, :])
    args = (mx.array([LOG2E]), mx.zeros((1,)), mx.array([0.3]))
    assert draw_full(x, *args, False).item() == draw_full_reference(x, *args, False).item() == 300
