"""Paged attention (mlx_loom/kernels/) against plain dense causal attention."""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_loom.kernels.paged_attention import grouped_paged_attention, paged_attention, write_kv
from mlx_loom.kernels.reference import dense_causal_attention, paged_attention_reference

IMPLS = {"dispatch": paged_attention, "reference": paged_attention_reference, "grouped": grouped_paged_attention}

BS = 4


def _scatter_rows(rng, lengths, NB, HKV, D):
    """Random dense K/V per row, written into a shuffled page pool; returns pools + tables."""
    k_pool = mx.zeros((HKV, NB, BS, D))
    v_pool = mx.zeros((HKV, NB, BS, D))
    free = list(rng.permutation(NB))
    tables, dense = [], []
    for L in lengths:
        pages = [int(free.pop()) for _ in range(-(-L // BS))]
        k = mx.array(rng.standard_normal((L, HKV, D)).astype(np.float32))
        v = mx.array(rng.standard_normal((L, HKV, D)).astype(np.float32))
        slots = mx.array([pages[p // BS] * BS + p % BS for p in range(L)])
        k_pool = write_kv(k_pool, slots, k)
        v_pool = write_kv(v_pool, slots, v)
        tables.append(pages)
        dense.append((k, v))
    return k_pool, v_pool, tables, dense


def _pad(tables, fill=0):
    width = max(len(t) for t in tables)
    return mx.array([t + [fill] * (width - len(t)) for t in tables], dtype=mx.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("H,HKV", [(4, 4), (6, 2), (9, 3)])
def test_decode_rows_match_dense(H, HKV, impl):
    rng = np.random.default_rng(0)
    D, lengths = 16, [1, 5, 8, 13, 30]
    k_pool, v_pool, tables, dense = _scatter_rows(rng, lengths, 40, HKV, D)
    q = mx.array(rng.standard_normal((len(lengths), H, 1, D)).astype(np.float32))
    q_pos = mx.array([[L - 1] for L in lengths], dtype=mx.int32)
    out = IMPLS[impl](q, k_pool, v_pool, _pad(tables, fill=7), q_pos, D**-0.5)
    for i, (k, v) in enumerate(dense):
        L = lengths[i]
        ref = dense_causal_attention(q[i : i + 1], k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], L - 1, D**-0.5)
        np.testing.assert_allclose(np.array(out[i : i + 1]), np.array(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_chunk_over_cached_prefix_matches_dense(impl):
    """A chunk of queries (positions 9..20) attends to 9 cached keys plus itself, causally."""
    rng = np.random.default_rng(1)
    H, HKV, D, L, start = 4, 2, 8, 21, 9
    k_pool, v_pool, tables, dense = _scatter_rows(rng, [L], 16, HKV, D)
    q = mx.array(rng.standard_normal((1, H, L - start, D)).astype(np.float32))
    q_pos = mx.arange(start, L, dtype=mx.int32)[None]
    out = IMPLS[impl](q, k_pool, v_pool, _pad(tables), q_pos, 0.3)
    k, v = dense[0]
    ref = dense_causal_attention(q, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None], start, 0.3)
    np.testing.assert_allclose(np.array(out), np.array(ref), rtol=1e-5, atol=1e-5)


def test_write_kv_touches_only_its_slots():
    pool = mx.zeros((2, 3, BS, 2))  # [HKV, NB, BS, D]
    vals = mx.array([[[1.0, 1.0], [2.0, 2.0]], [[3.0, 3.0], [4.0, 4.0]]])  # [T=2, HKV=2, D]
    pool = write_kv(pool, mx.array([5, 6]), vals)
    flat = np.array(pool).reshape(2, -1, 2)  # [HKV, NB*BS, D]
    np.testing.assert_array_equal(flat[0, [5, 6]], [[1, 1], [3, 3]])
    np.testing.assert_array_equal(flat[1, [5, 6]], [[2, 2], [4, 4]])
    assert flat.sum() == 20
