"""The native tiled paged-attention kernel (mlx_loom/kernels/native/attention*.{h,cpp}) against the
pure-MLX reference: odd lengths, chunk offsets, GQA ratios, page boundaries, several rows with their
own positions, every head size of the supported architectures, and scores far from zero."""

from __future__ import annotations

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_loom.kernels import qmm
from mlx_loom.kernels.paged_attention import native_attention_applies, paged_attention_rows
from mlx_loom.kernels.reference import dense_causal_attention, paged_attention_reference

pytestmark = pytest.mark.skipif(not qmm.native_available(), reason="native extension not built")


def _pools(rng, B, L, HKV, D, BS, spare=3):
    """Shuffled pages for B rows of L keys each: pools [HKV, NB, BS, D], tables [B, MB]."""
    MB = -(-L // BS)
    NB = B * MB + spare
    k = mx.array(rng.standard_normal((HKV, NB, BS, D)).astype(np.float32))
    v = mx.array(rng.standard_normal((HKV, NB, BS, D)).astype(np.float32))
    tables = mx.array(rng.permutation(NB)[: B * MB].reshape(B, MB).astype(np.int32))
    return k, v, tables


def _check(rng, B, LQ, H, HKV, D, BS, starts, q_gain=1.0, scale=None, tol=2e-5):
    L = max(starts) + LQ
    k, v, tables = _pools(rng, B, L, HKV, D, BS)
    q = mx.array((q_gain * rng.standard_normal((B, LQ, H, D))).astype(np.float32))
    q_pos = mx.array([[s + i for i in range(LQ)] for s in starts], dtype=mx.int32)
    scale = D**-0.5 if scale is None else scale
    out = qmm.native_module().paged_attention(q, k, v, tables, q_pos, scale)
    ref = paged_attention_reference(q.transpose(0, 2, 1, 3), k, v, tables, q_pos, scale).transpose(0, 2, 1, 3)
    assert np.isfinite(np.array(out)).all()
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=tol, atol=tol)


@pytest.mark.parametrize("D", [16, 32, 64, 80, 96, 128, 256])
def test_head_sizes(D):
    _check(np.random.default_rng(D), 1, 37, 4, 2, D, 16, [21])


@pytest.mark.parametrize("H,HKV", [(4, 4), (6, 2), (9, 3), (8, 2), (32, 4), (16, 1)])
def test_gqa_ratios(H, HKV):
    _check(np.random.default_rng(H * 10 + HKV), 1, 50, H, HKV, 64, 16, [13])


@pytest.mark.parametrize("BS", [1, 4, 16, 32, 64, 128])
@pytest.mark.parametrize("start,LQ", [(0, 1), (0, 63), (0, 64), (0, 65), (64, 64), (127, 2), (5, 300)])
def test_page_and_tile_boundaries(BS, start, LQ):
    _check(np.random.default_rng(BS + start + LQ), 1, LQ, 6, 2, 16, BS, [start])


def test_rows_at_their_own_positions():
    """Decode-style rows (LQ = 1) and multi-query rows, each row with its own context length."""
    rng = np.random.default_rng(7)
    _check(rng, 5, 1, 9, 3, 64, 16, [0, 1, 15, 16, 200])
    _check(rng, 3, 7, 8, 2, 32, 4, [0, 9, 70])


def test_large_scores_stay_finite_and_exact():
    """Peaked softmax (scores in the hundreds): the online max rescaling must not overflow or lose rows.
    float32 rounding of scores that large is ~1e-5 in the exponent, in both implementations."""
    _check(np.random.default_rng(3), 1, 90, 4, 2, 64, 16, [100], q_gain=30.0, tol=2e-4)


def test_long_chunk_matches_dense_attention():
    """A 512-query chunk over 1.5k cached keys, against plain dense attention on contiguous keys."""
    rng = np.random.default_rng(11)
    H, HKV, D, BS, start, LQ = 9, 3, 64, 16, 1536, 512
    L = start + LQ
    k = rng.standard_normal((HKV, L, D)).astype(np.float32)
    v = rng.standard_normal((HKV, L, D)).astype(np.float32)
    order = rng.permutation(L // BS)  # page p of the row lives at pool page order[p]
    k_pool = np.zeros((HKV, L // BS, BS, D), np.float32)
    v_pool = np.zeros_like(k_pool)
    k_pool[:, order] = k.reshape(HKV, L // BS, BS, D)
    v_pool[:, order] = v.reshape(HKV, L // BS, BS, D)
    q = mx.array(rng.standard_normal((1, LQ, H, D)).astype(np.float32))
    q_pos = mx.arange(start, L, dtype=mx.int32)[None]
    out = qmm.native_module().paged_attention(q, mx.array(k_pool), mx.array(v_pool), mx.array(order[None].astype(np.int32)),
                                             q_pos, D**-0.5)
    ref = dense_causal_attention(q.transpose(0, 2, 1, 3), mx.array(k)[None], mx.array(v)[None], start, D**-0.5)
    np.testing.assert_allclose(np.array(out), np.array(ref.transpose(0, 2, 1, 3)), rtol=1e-4, atol=1e-4)


def test_dispatch_falls_back_where_the_kernel_does_not_apply():
    """head_dim 8 (not a multiple of 16) and float16 pools run the reference, with the same results."""
    rng = np.random.default_rng(5)
    k, v, tables = _pools(rng, 1, 20, 2, 8, 4)
    q = mx.array(rng.standard_normal((1, 20, 4, 8)).astype(np.float32))
    q_pos = mx.arange(20, dtype=mx.int32)[None]
    assert not native_attention_applies(q, k)
    assert not native_attention_applies(q.astype(mx.float16), k.astype(mx.float16))
    out = paged_attention_rows(q, k, v, tables, q_pos, 0.3)
    ref = paged_attention_reference(q.transpose(0, 2, 1, 3), k, v, tables, q_pos, 0.3).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused():
    n = qmm.native_module()
    k = mx.zeros((2, 4, 4, 16))
    q = mx.zeros((1, 3, 4, 16))
    tables, q_pos = mx.zeros((1, 2), dtype=mx.int32), mx.zeros((1, 3), dtype=mx.int32)
    with pytest.raises(ValueError, match="head_dim"):
        n.paged_attention(mx.zeros((1, 3, 4, 8)), mx.zeros((2, 4, 4, 8)), mx.zeros((2, 4, 4, 8)), tables, q_pos, 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        n.paged_attention(mx.zeros((1, 3, 3, 16)), k, k, tables, q_pos, 1.0)
    with pytest.raises(ValueError, match="q_pos"):
        n.paged_attention(q, k, k, tables, mx.zeros((1, 2), dtype=mx.int32), 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        n.paged_attention(q, k, k, tables.astype(mx.float32), q_pos, 1.0)
