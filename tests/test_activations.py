import mlx_loom.scheduler  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np

from mlx_loom.kernels.activations import silu_mul, silu_mul_reference


def test_silu_mul_matches_reference_including_large_magnitudes():
    rng = np.random.default_rng(0)
    g = np.concatenate([rng.standard_normal(5000) * 4, [-200.0, -80.0, 0.0, 80.0, 200.0]]).astype(np.float32)
    u = rng.standard_normal(g.shape).astype(np.float32)
    got = np.array(silu_mul(mx.array(g), mx.array(u)))
    ref = np.array(silu_mul_reference(mx.array(g), mx.array(u)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
