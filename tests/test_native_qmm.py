"""Native affine quantized matmul (mlx_loom/kernels/native via mlx_loom.kernels.qmm) against mx.quantized_matmul
and a float64 numpy dequantize reference. Skipped when the extension is not built."""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import numpy as np
import pytest

from mlx_loom.kernels import qmm

import os
import subprocess
import sys

if qmm.native_available():
    from mlx_loom.kernels.native import _loom_native as native
else:
    native = None

needs_native = pytest.mark.skipif(
    not qmm.native_available(),
    reason=f"native extension not built ({qmm.native_unavailable_reason()}); "
    "build it with `python -m mlx_loom.kernels.native.build`")

# Every kernel family this CPU runs (e.g. avx512, avx2, scalar on this project's CI box), so a
# faster family never hides a slower one's bug.
ISAS = native.kernel_isas() if native is not None else ["none"]


@pytest.fixture(params=ISAS)
def isa(request):
    previous = native.kernel_isa()
    native.set_kernel_isa(request.param)
    yield request.param
    native.set_kernel_isa(previous)


# SmolLM2-135M (the default model): q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576.
MODEL_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def _quantized(rng, N, K, bits, group_size=32):
    W = mx.array(rng.standard_normal((N, K)).astype(np.float32))
    return mx.quantize(W, group_size=group_size, bits=bits)


def _dequant_np(w, scales, biases, bits, group_size=32):
    """Independent unpacking: element k of a row is bits (k % per)*bits.. of word k // per."""
    w = np.array(w).astype(np.uint64)
    per = 32 // bits
    shifts = np.arange(per, dtype=np.uint64) * bits
    q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], -1).astype(np.float64)
    s = np.repeat(np.array(scales, dtype=np.float64), group_size, axis=1)
    b = np.repeat(np.array(biases, dtype=np.float64), group_size, axis=1)
    return q * s + b


def _check(out, ref):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape
    tol = 1e-4 * max(1.0, np.abs(ref).max())
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=tol)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 13, 32, 33, 64])
def test_random_shapes_match_quantized_matmul_and_numpy(M, bits, isa):
    rng = np.random.default_rng(M * 10 + bits)
    # K around the AVX-512 4-bit chunk (128 values): short, exact, one word over, 1.5 chunks
    for N, K in [(1, 32), (7, 64), (13, 96), (61, 160), (130, 288), (259, 32), (5, 128), (9, 384), (11, 576)]:
        w, s, b = _quantized(rng, N, K, bits)
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
        out = native.affine_qmm(x, w, s, b, 32, bits)
        _check(out, mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=bits))
        _check(out, np.array(x, dtype=np.float64) @ _dequant_np(w, s, b, bits).T)


@needs_native
@pytest.mark.parametrize("M", [1, 4, 8, 64])
@pytest.mark.parametrize("N,K", MODEL_SHAPES)
def test_default_model_layer_shapes(N, K, M, isa):
    rng = np.random.default_rng(N + K + M)
    w, s, b = _quantized(rng, N, K, 4)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
    _check(qmm.affine_qmm(x, w, s, b), np.array(x, dtype=np.float64) @ _dequant_np(w, s, b, 4).T)


@needs_native
def test_tied_lm_head_8bit_shape(isa):
    """The default model's tied lm_head (token_embd is Q8_0): 576 -> 49152, one decode row."""
    rng = np.random.default_rng(0)
    w, s, b = _quantized(rng, 49152, 576, 8)
    x = mx.array(rng.standard_normal((2, 576)).astype(np.float32))
    _check(native.affine_qmm(x, w, s, b, 32, 8), np.array(x, dtype=np.float64) @ _dequant_np(w, s, b, 8).T)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [64, 128])
def test_larger_groups(group_size, bits, isa):
    rng = np.random.default_rng(group_size)
    for K in (256, 384, 640):
        w, s, b = _quantized(rng, 37, K, bits, group_size)
        for M in (1, 3, 9):
            x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
            ref = np.array(x, dtype=np.float64) @ _dequant_np(w, s, b, bits, group_size).T
            _check(native.affine_qmm(x, w, s, b, group_size, bits), ref)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_long_k_and_many_rows(bits, isa):
    # K over several 512-value panel chunks (sums carried across chunks), rows of x past one
    # ~1 MiB block (K = 2176: 120 rows a block), a panel cut short (N = 70 = 2 x 32 + 6).
    rng = np.random.default_rng(bits)
    K, N = 2176, 70
    w, s, b = _quantized(rng, N, K, bits, 64)
    for M in (5, 12, 13, 131):
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
        ref = np.array(x, dtype=np.float64) @ _dequant_np(w, s, b, bits, 64).T
        _check(native.affine_qmm(x, w, s, b, 64, bits), ref)


@needs_native
def test_kernel_family_switch():
    wanted = os.environ.get("MLX_LOOM_NATIVE_ISA")
    default = wanted if wanted in ISAS else ISAS[0]  # the fastest this CPU runs unless the env picks one
    assert native.kernel_isa() == default
    assert "scalar" in ISAS
    with pytest.raises(ValueError, match="not available"):
        native.set_kernel_isa("sse1")
    assert native.kernel_isa() == default


@needs_native
def test_batched_and_strided_inputs():
    rng = np.random.default_rng(1)
    w, s, b = _quantized(rng, 40, 96, 4)
    x3 = mx.array(rng.standard_normal((2, 3, 96)).astype(np.float32))  # [..., K] leading dims
    out = native.affine_qmm(x3, w, s, b)
    assert out.shape == (2, 3, 40)
    ref = np.array(x3, dtype=np.float64) @ _dequant_np(w, s, b, 4).T
    _check(out, ref)
    xt = mx.array(rng.standard_normal((96, 5)).astype(np.float32)).T  # non-contiguous view
    _check(native.affine_qmm(xt, w, s, b), np.array(xt, dtype=np.float64) @ _dequant_np(w, s, b, 4).T)
    xs = x3[1, 1:3]  # row slice with an offset
    _check(native.affine_qmm(xs, w, s, b), ref[1, 1:3])


@needs_native
def test_thread_counts_agree():
    rng = np.random.default_rng(2)
    w, s, b = _quantized(rng, 1536, 576, 4)
    x = mx.array(rng.standard_normal((6, 576)).astype(np.float32))
    outs = []
    try:
        for n in (1, 2, 3):
            native.set_num_threads(n)
            assert native.num_threads() == n
            outs.append(np.array(native.affine_qmm(x, w, s, b)))
    finally:
        native.set_num_threads(0)
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])  # same per-row arithmetic whatever the split


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_decode_batch_rows_equal_each_row_alone(bits, isa):
    """A batched decode step's rows on the direct path (up to 8 rows with AVX-512, else 4) give bit
    for bit what each row gives alone, so a request's tokens do not depend on its batch."""
    direct_rows = 8 if isa == "avx512" else 4
    rng = np.random.default_rng(4 + bits)
    for N, K in [(576, 576), (1536, 576), (576, 1536), (13, 160)]:
        w, s, b = _quantized(rng, N, K, bits)
        x = mx.array(rng.standard_normal((8, K)).astype(np.float32))
        alone = np.concatenate([np.array(native.affine_qmm(x[m : m + 1], w, s, b, 32, bits)) for m in range(8)])
        for M in range(2, direct_rows + 1):
            np.testing.assert_array_equal(np.array(native.affine_qmm(x[:M], w, s, b, 32, bits)), alone[:M])


@needs_native
def test_composes_with_mlx_ops_and_compile():
    rng = np.random.default_rng(3)
    w, s, b = _quantized(rng, 64, 128, 4)
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    f = mx.compile(lambda v: mx.maximum(native.affine_qmm(v * 2.0, w, s, b), 0.0).sum(axis=-1))
    ref = np.maximum(2.0 * np.array(x, dtype=np.float64) @ _dequant_np(w, s, b, 4).T, 0).sum(-1)
    _check(f(x), ref)


@needs_native
def test_bad_arguments_are_clear_errors():
    rng = np.random.default_rng(4)
    w, s, b = _quantized(rng, 8, 64, 4)
    with pytest.raises(ValueError, match="x must be float32"):
        native.affine_qmm(mx.zeros((1, 64), dtype=mx.float16), w, s, b)
    with pytest.raises(ValueError, match="must equal x.shape"):
        native.affine_qmm(mx.zeros((1, 96)), w, s, b)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        native.affine_qmm(mx.zeros((1, 64)), w, s, b, 32, 3)


@needs_native
def test_dispatcher_reports_and_falls_back():
    assert qmm.active_path().startswith("native")
    assert "affine_qmm: native" in qmm.describe()
    rng = np.random.default_rng(5)
    w, s, b = _quantized(rng, 16, 64, 4)
    x16 = mx.array(rng.standard_normal((2, 64)).astype(np.float16))  # not float32: reference path
    out = qmm.affine_qmm(x16, w, s.astype(mx.float16), b.astype(mx.float16))
    assert out.dtype == mx.float16
    ref = qmm.affine_qmm_reference(x16, w, s.astype(mx.float16), b.astype(mx.float16))
    np.testing.assert_array_equal(np.array(out), np.array(ref))


def test_reference_path_without_the_extension():
    """MLX_LOOM_NATIVE=0 (as when the build failed): same answers through mx.quantized_matmul."""
    code = (
        "import mlx_loom.kernels, mlx.core as mx\n"
        "from mlx_loom.kernels import qmm\n"
        "assert not qmm.native_available() and 'reference' in qmm.active_path(), qmm.describe()\n"
        "W = mx.random.normal((24, 64), key=mx.random.key(0))\n"
        "w, s, b = mx.quantize(W, group_size=32, bits=4)\n"
        "x = mx.random.normal((3, 64), key=mx.random.key(1))\n"
        "ref = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=4)\n"
        "assert mx.array_equal(qmm.affine_qmm(x, w, s, b), ref).item()\n"
        "print(qmm.describe())\n"
    )
    from pathlib import Path
    env = {**os.environ, "MLX_LOOM_NATIVE": "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "disabled by MLX_LOOM_NATIVE=0" in res.stdout
