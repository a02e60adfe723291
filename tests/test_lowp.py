"""The lowp kernels (mlx_loom/kernels/lowp.py: 16-bit weights read as stored, MXFP4 / NVFP4) against
their pure-MLX references and an independent numpy decode, on every kernel family this CPU runs;
the loader's and the draft builder's routing onto them. Skipped where the extension is not built."""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlx_loom.kernels import lowp, qmm  # noqa: E402

native = qmm.native_module()
pytestmark = pytest.mark.skipif(native is None, reason=f"native kernels not built: {qmm.native_unavailable_reason()}")
ISAS = native.kernel_isas() if native is not None else ["none"]
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


@pytest.fixture(params=ISAS)
def isa(request):
    previous = native.kernel_isa()
    native.set_kernel_isa(request.param)
    yield request.param
    native.set_kernel_isa(previous)


def _close(out, ref, tol=1e-4):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * max(1.0, np.abs(ref).max()))


def _fp4_numpy(w, scales, group_size: int, mode: str) -> np.ndarray:
    """Independent decode: nibble k % 8 of word k // 8; scale 2^(e - 127) (E8M0) or E4M3."""
    w = np.array(w).astype(np.uint64)
    q = ((w[..., None] >> (np.arange(8, dtype=np.uint64) * 4)) & 0xF).reshape(w.shape[0], -1)
    s = np.array(scales).astype(np.int64)
    if mode == "mxfp4":
        sv = np.ldexp(1.0, s - 127)
    else:
        e, m = (s >> 3) & 0xF, s & 7
        sv = np.where(e == 0, np.ldexp(m / 8.0, -6), np.ldexp(1 + m / 8.0, e - 7)) * np.where(s & 0x80, -1, 1)
    return E2M1[q] * np.repeat(sv, group_size, axis=1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 13, 64])
def test_half_matmul_matches_reference_for_odd_shapes(dtype, M, isa):
    rng = np.random.default_rng(M)
    # K: below one SIMD vector, not a multiple of 8 / 16 / 32, exact multiples; N around the 16-row blocks
    for N, K in [(1, 1), (3, 7), (17, 33), (16, 64), (33, 100), (5, 576), (61, 1537)]:
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
        w = mx.array(rng.standard_normal((N, K)).astype(np.float32)).astype(getattr(mx, dtype))
        out = native.half_matmul(x, w)
        _close(out, lowp.half_matmul_reference(x, w))
        _close(out, np.array(x, dtype=np.float64) @ np.array(w.astype(mx.float32), dtype=np.float64).T)


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "mxfp4", "nvfp4"])
def test_each_row_is_bit_identical_whatever_the_rows_beside_it(kind, isa):
    """A row of x gives the same bits alone or among up to 13 rows: a verification step (last token +
    drafts, one row each) then computes exactly what decoding each token alone would."""
    rng = np.random.default_rng(7)
    x = mx.array(rng.standard_normal((13, 576)).astype(np.float32))
    w = mx.array(rng.standard_normal((37, 576)).astype(np.float32))
    if kind in lowp.FP4_MODES:
        wq, s = mx.quantize(w, mode=kind)
        matmul = lambda v: native.fp4_matmul(v, wq, s, kind)  # noqa: E731
    else:
        wh = w.astype(getattr(mx, kind))
        matmul = lambda v: native.half_matmul(v, wh)  # noqa: E731
    alone = np.stack([np.array(matmul(x[i : i + 1]))[0] for i in range(13)])
    for M in (2, 4, 5, 8, 13):
        np.testing.assert_array_equal(np.array(matmul(x[:M])), alone[:M])


def test_half_matmul_reads_subnormals_and_specials(isa):
    bits = np.array([0x0001, 0x03FF, 0x8001, 0x7BFF, 0x3C00, 0x0000, 0x8000, 0x0400, 0x7C00, 0xFC00, 0x0200, 0x83FF] * 4,
                    dtype=np.uint16)
    w = mx.array(bits.view(np.float16).reshape(1, -1))
    x = mx.ones((1, w.shape[1]))
    _close(native.half_matmul(x, w), lowp.half_matmul_reference(x, w), tol=1e-6)


@pytest.mark.parametrize("mode,group_size", [("mxfp4", 32), ("nvfp4", 16)])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9, 33])
def test_fp4_matmul_matches_quantized_matmul_and_numpy(mode, group_size, M, isa):
    rng = np.random.default_rng(M + group_size)
    for N, K in [(1, 32), (7, 64), (16, 96), (17, 160), (130, 576), (5, 1536)]:
        W = mx.array((rng.standard_normal((N, K)) * rng.uniform(0.01, 10, (N, 1))).astype(np.float32))
        w, scales = mx.quantize(W, mode=mode)
        x = mx.array(rng.standard_normal((M, K)).astype(np.float32))
        out = native.fp4_matmul(x, w, scales, mode)
        _close(out, lowp.fp4_matmul_reference(x, w, scales, mode))
        _close(out, np.array(x, dtype=np.float64) @ _fp4_numpy(w, scales, group_size, mode).T)


def test_fp4_group_boundaries_keep_their_own_scales(isa):
    # Each group of one row holds values of a very different magnitude: a scale read from the
    # neighbouring group shows up as a large error.
    K = 128
    W = np.concatenate([np.full((1, 32), 10.0 ** e) * np.linspace(-1, 1, 32) for e in (-3, 2, -1, 4)], axis=1)
    w, scales = mx.quantize(mx.array(W.astype(np.float32)), mode="mxfp4")
    for k in range(0, K, 8):
        x = mx.zeros((1, K)).at[0, k].add(1.0)
        _close(native.fp4_matmul(x, w, scales, "mxfp4"), lowp.fp4_matmul_reference(x, w, scales, "mxfp4"))


def test_bad_arguments_are_refused():
    x = mx.ones((1, 64))
    with pytest.raises(ValueError):
        native.half_matmul(x, mx.ones((3, 64)))  # float32 weights
    with pytest.raises(ValueError):
        native.half_matmul(x, mx.ones((3, 63), dtype=mx.float16))
    w, s = mx.quantize(mx.ones((4, 64)), mode="mxfp4")
    with pytest.raises(ValueError):
        native.fp4_matmul(x, w, s, "mxfp8")
    with pytest.raises(ValueError):
        native.fp4_matmul(mx.ones((1, 32)), w, s, "mxfp4")


def test_wrappers_fall_back_to_mlx_for_many_rows():
    w = mx.random.normal((24, 64), key=mx.random.key(0)).astype(mx.float16)
    x = mx.random.normal((lowp.NATIVE_MAX_ROWS + 1, 64), key=mx.random.key(1))
    _close(lowp.half_matmul(x, w), lowp.half_matmul_reference(x, w))
    wq, s = mx.quantize(w.astype(mx.float32), mode="mxfp4")
    _close(lowp.fp4_matmul(x, wq, s), lowp.fp4_matmul_reference(x, wq, s))


def test_routing_switches_16_bit_and_fp4_modules_only():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(64, 32), nn.Embedding(10, 64), nn.Linear(64, 32))
    model.layers[0].set_dtype(mx.float16)
    model.layers[2].set_dtype(mx.bfloat16)
    model.layers[1] = nn.QuantizedLinear.from_linear(model.layers[1], mode="mxfp4")
    assert lowp.route_lowp_modules(model) == 3
    assert isinstance(model.layers[0], lowp.NativeHalfLinear)
    assert isinstance(model.layers[1], lowp.NativeFp4Linear)
    assert isinstance(model.layers[2], lowp.NativeHalfEmbedding)
    assert type(model.layers[3]) is nn.Linear  # float32: BLAS as before
    x = mx.random.normal((2, 64), key=mx.random.key(2))
    _close(model.layers[0](x), lowp.half_matmul_reference(x, model.layers[0].weight) + model.layers[0].bias)
    assert model.layers[2](mx.array([1, 2])).dtype == mx.float32


def test_loader_keeps_a_16_bit_checkpoint_16_bit(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_model import make_tiny_llama_dir

    from mlx_loom.models.loader import load_model

    d = make_tiny_llama_dir(tmp_path / "m")
    weights = mx.load(str(d / "model.safetensors"))
    mx.save_safetensors(str(d / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    half = load_model(str(d))
    proj = half.model.model.layers[0].self_attn.q_proj
    assert isinstance(proj, lowp.NativeHalfLinear) and proj.weight.dtype == mx.float16
    assert half.model.model.layers[0].input_layernorm.weight.dtype == mx.float32
    assert half.dtype == mx.float32
    monkeypatch.setenv("MLX_LOOM_HALF_WEIGHTS", "0")  # the float32 path it replaces
    wide = load_model(str(d))
    assert wide.model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    ids = mx.array([[1, 5, 9, 20]])
    _close(half.model(ids), wide.model(ids), tol=1e-4)


def test_load_check_keeps_16_bit_projections_whose_16_bit_product_would_overflow():
    """The load check feeds a 16-bit projection float32 rows (what the float32 model around it feeds):
    a width-576 float16 product at the check's 4096 scale overflows float16, which once reverted every
    projection of the float16 SmolLM2 to MLX's own 16-bit matmul (~8x slower decode)."""
    from mlx_loom.kernels.route_check import verify_routes

    model = nn.Sequential(nn.Linear(576, 64, bias=False))
    model.layers[0].weight = (mx.random.normal((64, 576), key=mx.random.key(3)) * 0.5).astype(mx.float16)
    assert lowp.route_lowp_modules(model) == 1
    x16 = (mx.random.normal((1, 576), key=mx.random.key(4)) * 4096).astype(mx.float16)
    assert not mx.isfinite(x16 @ model.layers[0].weight.T).all().item()  # the 16-bit product overflows
    assert verify_routes(model) == []
    assert isinstance(model.layers[0], lowp.NativeHalfLinear)
