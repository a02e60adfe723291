import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
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


def test_native_silu_mul_on_odd_sizes_strided_inputs_and_extremes():
    """The native primitive: lengths off the 8-lane and task boundaries, a transposed (strided)
    input, and huge magnitudes either way."""
    from mlx_loom.kernels import qmm

    if not qmm.native_available():
        return
    n = qmm.native_module()
    rng = np.random.default_rng(1)
    for size in (1, 7, 8, 9, 4095, (1 << 15) + 3, 100_003):
        g = mx.array((rng.standard_normal(size) * 6).astype(np.float32))
        u = mx.array(rng.standard_normal(size).astype(np.float32))
        np.testing.assert_allclose(np.array(n.silu_mul(g, u)), np.array(silu_mul_reference(g, u)), rtol=1e-5, atol=1e-6)
    g = mx.array(rng.standard_normal((64, 48)).astype(np.float32)).T
    u = mx.array(rng.standard_normal((48, 64)).astype(np.float32))
    np.testing.assert_allclose(np.array(n.silu_mul(g, u)), np.array(silu_mul_reference(g, u)), rtol=1e-5, atol=1e-6)
    g = mx.array([-1e30, -90.0, -50.0, 50.0, 90.0, 1e30] * 3 + [-90.0], dtype=mx.float32)  # vector lanes + tail
    got, ref = np.array(n.silu_mul(g, mx.ones_like(g))), np.array(silu_mul_reference(g, mx.ones_like(g)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-20)
