"""Affine-quantized matmul: x @ dequantize(w, scales, biases).T. Reference: mx.quantized_matmul.

MLX layout (what the default GGUF Q4_1 / Q8_0 tensors load as): w uint32 [N, K*bits/32] packed
low bits first, scales / biases [N, K/group_size], x [..., K] -> [..., N].

On the CPU, MLX's own quantized matmul is scalar single-threaded code (~0.5 GB/s). The native
extension in mlx_loom/kernels/native (an MLX custom primitive: AVX-512 or AVX2/FMA on x86_64, NEON on
arm64, portable C++ otherwise, multi-threaded) runs the same contract near memory bandwidth for one row and at
GEMM speed for many. It is used when it was built (scripts/install.sh builds it), the default
device is the CPU and the operands are float32; otherwise this falls back to the reference.
Metal and CUDA always use MLX's own kernels. MLX_LOOM_NATIVE=0 turns the native path off.
"""

from __future__ import annotations

import logging
import os

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger(__name__)

_native = None
_native_error: str | None = None
if os.environ.get("MLX_LOOM_NATIVE", "1") == "0":
    _native_error = "disabled by MLX_LOOM_NATIVE=0"
else:
    try:
        from mlx_loom.kernels.native import _loom_native as _native
    except Exception as exc:  # not built, or built against another mlx / nanobind ABI
        _native_error = f"{type(exc).__name__}: {exc}"


def native_available() -> bool:
    """True when the compiled extension imported."""
    return _native is not None


def native_on_cpu() -> bool:
    """The extension imported and the default device is the CPU: its primitives can run here."""
    return _native is not None and mx.default_device() == mx.cpu


def native_module():
    """The compiled extension module (mlx_loom.kernels.native._loom_native); None when unavailable."""
    return _native


def native_unavailable_reason() -> str | None:
    return _native_error


def active_path() -> str:
    """What affine_qmm runs for float32 operands on the current default device."""
    if mx.default_device() != mx.cpu:
        return "mlx (GPU)"
    if _native is None:
        return "mlx (reference: native extension unavailable)"
    return f"native ({_native.kernel_isa()}, {_native.num_threads()} threads)"


def describe() -> str:
    reason = "" if _native is not None else f" [{_native_error}]"
    return f"affine_qmm: {active_path()}{reason}"


def _native_ok(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> bool:
    return (
        _native is not None
        and mx.default_device() == mx.cpu
        and bits in (4, 8)
        and group_size in (32, 64, 128)
        and x.dtype == mx.float32
        and scales.dtype == mx.float32
        and biases.dtype == mx.float32
        and w.dtype == mx.uint32
    )


def affine_qmm(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int = 32, bits: int = 4
) -> mx.array:
    """x [..., K] @ dequantize(w [N, K*bits/32], scales, biases [N, K/group_size]).T -> [..., N]."""
    if _native_ok(x, w, scales, biases, group_size, bits):
        return _native.affine_qmm(x, w, scales, biases, group_size, bits)
    return affine_qmm_reference(x, w, scales, biases, group_size, bits)


def affine_qmm_reference(
    x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int = 32, bits: int = 4
) -> mx.array:
    return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits)


def set_num_threads(n: int) -> None:
    """Threads per native call (0 = one per available CPU); no-op without the extension."""
    if _native is not None:
        _native.set_num_threads(n)


def _is_affine(module) -> bool:
    return getattr(module, "mode", "affine") == "affine" and hasattr(module, "scales") and hasattr(module, "bits")


def linear(module, x: mx.array) -> mx.array:
    """module(x), with an affine nn.QuantizedLinear routed through affine_qmm (native on the CPU)."""
    if not isinstance(module, nn.QuantizedLinear) or not _is_affine(module):
        return module(x)
    y = affine_qmm(x, module.weight, module.scales, module.biases, module.group_size, module.bits)
    return y + module.bias if "bias" in module else y


def embedding_logits(embedding, h: mx.array) -> mx.array:
    """Tied lm_head: h @ E.T, with an affine nn.QuantizedEmbedding routed through affine_qmm."""
    if not isinstance(embedding, nn.QuantizedEmbedding) or not _is_affine(embedding):
        return embedding.as_linear(h)
    return affine_qmm(h, embedding.weight, embedding.scales, embedding.biases, embedding.group_size, embedding.bits)


class NativeQuantizedLinear(nn.QuantizedLinear):
    """An affine nn.QuantizedLinear whose matmul is affine_qmm (the native kernel on the CPU)."""

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self, x)


class NativeQuantizedEmbedding(nn.QuantizedEmbedding):
    """An affine nn.QuantizedEmbedding whose tied-head matmul is affine_qmm."""

    def as_linear(self, x: mx.array) -> mx.array:
        return embedding_logits(self, x)


def route_quantized_modules(model: nn.Module) -> int:
    """Make every affine quantized Linear / Embedding of `model` one of the classes above, so the
    model's own code runs the native kernels. The instances keep their parameters and names (a
    class switch, not a copy: loaders, draft builders and state dicts see the same modules).
    Returns how many modules were switched."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear and _is_affine(module):
            module.__class__ = NativeQuantizedLinear
        elif type(module) is nn.QuantizedEmbedding and _is_affine(module):
            module.__class__ = NativeQuantizedEmbedding
        else:
            continue
        switched += 1
    return switched
