import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_loom.kernels.token_mask import apply_token_bitmask, apply_token_bitmask_reference


@pytest.mark.parametrize("S,V", [(1, 32), (3, 100), (5, 49152), (2, 31)])
def test_bitmask_matches_reference(S, V):
    rng = np.random.default_rng(V)
    logits = rng.standard_normal((S, V)).astype(np.float32)
    mask = rng.integers(-(2**31), 2**31, size=(S, (V + 31) // 32), dtype=np.int64).astype(np.int32)
    mask[0, 0] = 0b101  # tokens 0 and 2 of row 0, nothing else in that word
    got = np.array(apply_token_bitmask(mx.array(logits), mx.array(mask)))
    ref = apply_token_bitmask_reference(logits, mask)
    np.testing.assert_array_equal(got, ref)
    assert np.isfinite(got[0, 0]) and got[0, 1] == -np.inf and np.isfinite(got[0, 2])
