"""A routed module must compute what its own class computes: checked at load, one module per
distinct (class, parameter shapes and settings), on rows at scales up to 4096 and a zero row, so
activations reach the range where a dropped clamp or a rounding shortcut would show. A routed
module that differs gets its own class back (the model's own code runs it), with the reason logged.

`own_classes` runs a block with every module in its own class: the self-check's reference is the
model as mlx-lm's loader builds it (mlx_loom/worker/self_check.py).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("mlx_loom.engine")

SCALES = (0.0, 1.0, 64.0, 4096.0)  # row r of every check input is N(0, 1) times SCALES[r]
_ROPE_OFFSETS = (0, 4097)  # positions past a short probe's: the rotation angles differ there


def own_class(module: nn.Module) -> type:
    """The first class of the module's MRO not defined by mlx-loom: the class the model built."""
    return next(c for c in type(module).__mro__ if not c.__module__.startswith("mlx_loom."))


@contextlib.contextmanager
def own_classes(model: nn.Module) -> Iterator[None]:
    """Every module of `model` in its own class inside the block; the routed classes back after it."""
    saved = [(m, type(m)) for _, m in model.named_modules()]
    try:
        for module, _ in saved:
            module.__class__ = own_class(module)
        yield
    finally:
        for module, cls in saved:
            module.__class__ = cls


def verify_routes(model: nn.Module) -> list[str]:
    """Give each routed module whose output differs from its own class's its class back; the reasons."""
    verdicts: dict[tuple, str | None] = {}
    reasons = []
    for name, module in model.named_modules():
        own = own_class(module)
        if own is type(module):
            continue
        key = _signature(module)
        if key not in verdicts:
            verdicts[key] = _difference(module, own)
        if verdicts[key] is not None:
            reasons.append(f"{name} ({type(module).__name__}): {verdicts[key]}")
            log.warning("module %s runs its own %s, not the routed %s: %s", name, own.__name__,
                        type(module).__name__, verdicts[key])
            module.__class__ = own
    return reasons


def _signature(module: nn.Module) -> tuple:
    """What the routed computation can depend on: class, parameter shapes / dtypes, scalar settings."""
    params = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in module.items() if isinstance(v, mx.array)))
    children = tuple(sorted((k, _signature(v)) for k, v in module.items() if isinstance(v, nn.Module)))
    scalars = tuple(sorted((k, v) for k, v in vars(module).items()
                           if isinstance(v, (int, float, bool, str, type(None))) and not k.startswith("_")))
    return type(module), params, children, scalars


def _difference(module: nn.Module, own: type) -> str | None:
    """None when the routed call equals the own class's on every check input; else what differs."""
    routed = type(module)
    try:
        worst = 0.0
        for call, x in _cases(module):
            got = call(module, x)
            module.__class__ = own
            try:
                expect = call(module, x)
            finally:
                module.__class__ = routed
            worst = max(worst, _row_error(got, expect))
    except (TypeError, ValueError, AttributeError) as exc:
        return f"the check could not run it ({type(exc).__name__}: {exc})"
    tol = 1e-4 if _dtype(module) == mx.float32 else 1e-2
    return None if worst <= tol else f"relative error {worst:.3g} on inputs up to {SCALES[-1]:g} (tolerance {tol:g})"


def _row_error(got: mx.array, expect: mx.array) -> float:
    """Max over rows (last axis is a row) of max |got - expect| / max |expect|; inf on another shape or
    non-finite values in other places."""
    if got.shape != expect.shape:
        return float("inf")
    got, expect = got.astype(mx.float32), expect.astype(mx.float32)
    if not mx.array_equal(mx.isfinite(got), mx.isfinite(expect)).item():
        return float("inf")
    finite = mx.isfinite(expect)
    got, expect = mx.where(finite, got, 0.0), mx.where(finite, expect, 0.0)
    diff = mx.abs(got - expect).max(axis=-1)
    scale = mx.maximum(mx.abs(expect).max(axis=-1), 1e-30)
    return (diff / scale).max().item() if diff.size else 0.0


def _cases(module: nn.Module) -> list[tuple]:
    """(call, input) pairs for the routed module kinds: RoPE, embeddings (ids and the tied-head matmul),
    everything else x -> y."""
    width, dtype = _width(module), getattr(type(module), "check_input_dtype", None) or _dtype(module)
    rows = mx.random.normal((len(SCALES), width), key=mx.random.key(width)) * mx.array(SCALES)[:, None]
    if isinstance(module, nn.RoPE):  # [B, H, L, D]: the rows as positions of one head
        x = rows[None, None].astype(dtype)
        return [(lambda m, v, o=o: m(v, offset=o), x) for o in _ROPE_OFFSETS] + \
               [(lambda m, v: m(v, offset=mx.array([_ROPE_OFFSETS[-1]])), x)]
    x = rows[None].astype(dtype)  # [1, R, width]
    if isinstance(module, nn.QuantizedEmbedding):
        return [(lambda m, v: m.as_linear(v), x)]
    if isinstance(module, nn.Embedding):  # token ids -> rows, and the tied head on float rows
        vocab = module.weight.shape[0]
        ids = mx.array([[0, vocab // 3, vocab // 2, vocab - 1]], dtype=mx.int32)
        return [(lambda m, v: m(v), ids), (lambda m, v: m.as_linear(v), x)]
    return [(lambda m, v: m(v), x)]


def _width(module: nn.Module) -> int:
    """Input features of the module (the gate projection's for an MLP)."""
    if "gate_proj" in module:
        return _width(module["gate_proj"])
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return module.weight.shape[1] * 32 // module.bits
    if isinstance(module, nn.RoPE):
        return module.dims
    return module.weight.shape[-1] if module.weight.ndim == 2 else module.weight.shape[0]


def _dtype(module: nn.Module) -> mx.Dtype:
    """The float dtype of the module's parameters (quantized layers: their scales); float32 if none."""
    from mlx.utils import tree_flatten

    floats = [v.dtype for _, v in tree_flatten(module.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    return floats[0] if floats else mx.float32
