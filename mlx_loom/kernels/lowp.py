"""Matmuls over weights stored below float32: 16-bit (float16 / bfloat16) and 4-bit microscaling
(MXFP4, NVFP4). The 16-bit target and the MXFP4 self-draft of speculative decoding run on these.

    half_matmul(x [..., K] f32, w [N, K] f16/bf16)                 -> [..., N] f32 = x @ w.T
    fp4_matmul(x [..., K] f32, w [N, K/8] u32, scales [N, K/g] u8) -> [..., N] f32
        = mx.quantized_matmul(x, w, scales, None, transpose=True, mode=mode)

The references (`*_reference`) compose MLX ops and are the tested contract. On the CPU, MLX widens
16-bit weights to float32 on every call (or the loader widens them once, doubling the bytes read
per token) and its MXFP4 quantized matmul is scalar code (~0.2 GB/s); the native LowpMatmul
primitive (mlx_loom/kernels/native/lowp*.cpp, the affine kernels' ISA families) reads the stored
bytes directly with float32 accumulation. It serves up to NATIVE_MAX_ROWS rows of x (decode,
verification, drafting); prefill-sized products go to MLX (weights widened once for the call, then
BLAS), where the widening is paid once per many tokens.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels import qmm

HALF_DTYPES = (mx.float16, mx.bfloat16)
FP4_MODES = {"mxfp4": 32, "nvfp4": 16}  # mode -> group size (MLX's fixed table)
NATIVE_MAX_ROWS = 64
"""Rows of x up to which the native kernels run (they re-read each 16-row block of w per 4 rows
of x from cache); above it MLX's widen-then-GEMM is faster."""


def half_weights_enabled() -> bool:
    """The loader keeps 16-bit weights 16-bit on the CPU (MLX_LOOM_HALF_WEIGHTS=0: widen to float32)."""
    return qmm.native_on_cpu() and os.environ.get("MLX_LOOM_HALF_WEIGHTS", "1") != "0"


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1] if x.shape[-1] else 0


def _native_ok(x: mx.array) -> bool:
    return qmm.native_on_cpu() and x.dtype == mx.float32 and _rows(x) <= NATIVE_MAX_ROWS


def half_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x [..., K] @ w [N, K].T with w float16 / bfloat16 read as stored -> float32 [..., N]."""
    if _native_ok(x) and w.dtype in HALF_DTYPES:
        return qmm.native_module().half_matmul(x, w)
    return half_matmul_reference(x, w)


def half_matmul_reference(x: mx.array, w: mx.array) -> mx.array:
    return x @ w.astype(mx.float32).T  # [..., K] @ [K, N]


def fp4_matmul(x: mx.array, w: mx.array, scales: mx.array, mode: str = "mxfp4") -> mx.array:
    """x [..., K] @ dequantize(w [N, K/8], scales [N, K/group], mode).T -> float32 [..., N]."""
    if _native_ok(x) and mode in FP4_MODES:
        return qmm.native_module().fp4_matmul(x, w, scales, mode)
    if qmm.native_on_cpu() and mode in FP4_MODES:  # many rows: widen once, then BLAS
        group_size = FP4_MODES[mode]
        return x @ mx.dequantize(w, scales, None, group_size, 4, mode=mode, dtype=mx.float32).T
    return fp4_matmul_reference(x, w, scales, mode)


def fp4_matmul_reference(x: mx.array, w: mx.array, scales: mx.array, mode: str = "mxfp4") -> mx.array:
    return mx.quantized_matmul(x, w, scales, None, transpose=True, group_size=FP4_MODES[mode], bits=4, mode=mode)


# -- the loader's class switches (mlx_loom/models/routing.py) --

class NativeHalfLinear(nn.Linear):
    """An nn.Linear with a float16 / bfloat16 weight whose matmul is half_matmul (float32 out)."""

    # The loader keeps weights 16-bit only under a float32 model (its activations are float32): the
    # load-time check (route_check.py) compares on such inputs, not on 16-bit ones the model never feeds.
    check_input_dtype = mx.float32

    def __call__(self, x: mx.array) -> mx.array:
        y = half_matmul(x, self.weight)
        return y + self.bias if "bias" in self else y


class NativeHalfEmbedding(nn.Embedding):
    """An nn.Embedding with a 16-bit table: rows come out float32 (the CPU model runs float32) and
    the tied head is half_matmul."""

    check_input_dtype = mx.float32  # as NativeHalfLinear's

    def __call__(self, x: mx.array) -> mx.array:
        return self.weight[x].astype(mx.float32)

    def as_linear(self, x: mx.array) -> mx.array:
        return half_matmul(x, self.weight)


class NativeFp4Linear(nn.QuantizedLinear):
    """An nn.QuantizedLinear in mxfp4 / nvfp4 mode whose matmul is fp4_matmul."""

    check_input_dtype = mx.float32  # its scales are uint8: the model around it computes in float32

    def __call__(self, x: mx.array) -> mx.array:
        y = fp4_matmul(x, self.weight, self.scales, self.mode)
        return y + self.bias if "bias" in self else y


def route_lowp_modules(model: nn.Module) -> int:
    """Switch 16-bit Linear / Embedding and fp4 QuantizedLinear modules of `model` to the classes
    above (a class switch: parameters and names stay). Only where the native kernels run (CPU);
    returns how many modules were switched."""
    if not qmm.native_on_cpu():
        return 0
    switched = 0
    for _, module in model.named_modules():
        kind = type(module)
        if kind is nn.Linear and module.weight.dtype in HALF_DTYPES:
            module.__class__ = NativeHalfLinear
        elif kind is nn.Embedding and module.weight.dtype in HALF_DTYPES:
            module.__class__ = NativeHalfEmbedding
        elif kind is nn.QuantizedLinear and getattr(module, "mode", "affine") in FP4_MODES and "biases" not in module:
            module.__class__ = NativeFp4Linear
        else:
            continue
        switched += 1
    return switched
