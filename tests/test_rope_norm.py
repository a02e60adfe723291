"""The native RmsNorm and Rope primitives against their references (mx.fast.rms_norm; the rotation
mx.fast.rope applies), and the references against the models' own RoPE modules."""

from __future__ import annotations

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import initialize_rope

from mlx_loom.kernels import qmm
from mlx_loom.kernels.decode_layer import rope_inv_freq
from mlx_loom.kernels.rope_norm import (NativeRMSNorm, NativeRoPE, rms_norm, rms_norm_reference, rope, rope_reference,
                                        route_norm_rope_modules)

NATIVE = qmm.native_module()


def _close(got: mx.array, ref: mx.array, tol: float = 2e-5) -> None:
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(1, 64), (3, 576), (37, 960), (600, 256), (5, 9, 128), (2, 3, 4, 24)])
def test_native_rms_norm_matches_reference(shape):
    x = mx.random.normal(shape, key=mx.random.key(1)) * 3
    w = mx.random.normal(shape[-1:], key=mx.random.key(2))
    assert qmm.native_available(), qmm.native_unavailable_reason()
    _close(NATIVE.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    _close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_native_rms_norm_reads_strided_inputs():
    x = mx.random.normal((64, 5), key=mx.random.key(3)).T  # [5, 64], a transposed view
    w = mx.random.normal((64,), key=mx.random.key(4))
    _close(NATIVE.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("T,heads,D", [(1, 9, 64), (7, 3, 128), (33, 2, 24), (300, 4, 80), (2, 1, 256)])
def test_native_rope_matches_reference(T, heads, D, traditional):
    x = mx.random.normal((T, heads, D), key=mx.random.key(T))
    positions = mx.array(np.random.default_rng(T).integers(0, 9000, T), dtype=mx.int32)  # any order, far positions
    inv_freq = 1.0 / mx.power(10000.0, mx.arange(0, D, 2, dtype=mx.float32) / D)
    _close(NATIVE.rope(x, positions, inv_freq, traditional), rope_reference(x, positions, inv_freq, traditional),
           tol=2e-4)  # theta up to 9000 rad: float32 sin/cos of large arguments differ in the last bits
    _close(rope(x, positions, inv_freq, traditional), rope_reference(x, positions, inv_freq, traditional), tol=2e-4)


def test_native_rope_reads_strided_inputs():
    x = mx.random.normal((4, 3, 64), key=mx.random.key(5)).transpose(1, 0, 2)  # [3, 4, 64] view
    positions = mx.array([5, 0, 70], dtype=mx.int32)
    inv_freq = 1.0 / mx.power(10000.0, mx.arange(0, 64, 2, dtype=mx.float32) / 64)
    _close(NATIVE.rope(x, positions, inv_freq, False), rope_reference(x, positions, inv_freq, False))


def test_native_primitives_refuse_bad_arguments():
    x = mx.zeros((2, 3, 8))
    with pytest.raises(ValueError, match="positions must be int32"):
        NATIVE.rope(x, mx.array([1, 2, 3], dtype=mx.int32), mx.zeros((4,)), False)
    with pytest.raises(ValueError, match="inv_freq"):
        NATIVE.rope(x, mx.array([1, 2], dtype=mx.int32), mx.zeros((3,)), False)
    with pytest.raises(ValueError, match="float32"):
        NATIVE.rms_norm(x.astype(mx.float16), mx.zeros((8,)), 1e-5)


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_reference_is_what_the_models_rope_computes(traditional, scaling):
    """The contract the runner relies on: rope_inv_freq + rope_reference == the model's own module."""
    D = 64
    module = initialize_rope(D, base=500000.0, traditional=traditional, scaling_config=scaling,
                             max_position_embeddings=4096)
    found = rope_inv_freq(module, D)
    assert found is not None and found[1] == traditional
    x = mx.random.normal((6, 4, D), key=mx.random.key(9))
    positions = mx.array([0, 1, 17, 63, 200, 3000], dtype=mx.int32)
    expect = module(x[:, :, None], offset=positions).reshape(6, 4, D)  # one row per token, as the runner calls it
    _close(rope_reference(x, positions, *found), expect, tol=5e-4)
    _close(rope(x, positions, *found), expect, tol=5e-4)


def test_norm_module_and_primitive_agree():
    norm = nn.RMSNorm(96, eps=1e-6)
    norm.weight = mx.random.normal((96,), key=mx.random.key(11))
    x = mx.random.normal((4, 96), key=mx.random.key(12))
    _close(rms_norm(x, norm.weight, norm.eps), norm(x))


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("base,scale", [(10000.0, 1.0), (1000000.0, 1.0), (500000.0, 0.25)])
@pytest.mark.parametrize("offset", [0, 17, "scalar array", "per row"])
def test_routed_rope_is_mlx_rope(traditional, base, scale, offset):
    """NativeRoPE on mlx-lm's shapes ([B, H, L, D] views of [B, L, H, D]) == nn.RoPE, far positions included."""
    B, L, H, D = 4, 5, 3, 64
    x = mx.random.normal((B, L, H, D), key=mx.random.key(21)).transpose(0, 2, 1, 3)
    offset = {"scalar array": mx.array(40), "per row": mx.array([0, 7, 100, 3000])}.get(offset, offset)
    plain = nn.RoPE(D, traditional=traditional, base=base, scale=scale)
    holder = nn.Module()
    holder.rope = nn.RoPE(D, traditional=traditional, base=base, scale=scale)
    assert route_norm_rope_modules(holder) == 1 and type(holder.rope) is NativeRoPE
    # exact inv_freq formula: ~1e-6 (scale folded into it: a few ulp more at position 3000)
    _close(holder.rope(x, offset=offset), plain(x, offset=offset), tol=2e-6 if scale == 1.0 else 2e-5)


def test_routed_rope_leaves_other_calls_to_nn_rope():
    holder = nn.Module()
    holder.partial = nn.RoPE(32)  # rotates half of a 64-wide head: nn.RoPE's own call
    route_norm_rope_modules(holder)
    x = mx.random.normal((2, 3, 4, 64), key=mx.random.key(22))
    assert mx.array_equal(holder.partial(x, offset=5), nn.RoPE(32)(x, offset=5))
    x3 = mx.random.normal((3, 4, 32), key=mx.random.key(23))  # 3-D input
    assert mx.array_equal(holder.partial(x3, offset=2), nn.RoPE(32)(x3, offset=2))


@pytest.mark.parametrize("shape", [(3, 576), (2, 5, 9, 64), (1, 600, 256)])
def test_routed_rms_norm_is_mlx_rms_norm(shape):
    holder = nn.Module()
    holder.norm = nn.RMSNorm(shape[-1], eps=1e-6)
    holder.norm.weight = mx.random.normal(shape[-1:], key=mx.random.key(24))
    plain = nn.RMSNorm(shape[-1], eps=1e-6)
    plain.weight = holder.norm.weight
    assert route_norm_rope_modules(holder) == 1 and type(holder.norm) is NativeRMSNorm
    x = mx.random.normal(shape, key=mx.random.key(25)) * 3
    _close(holder.norm(x), plain(x))

