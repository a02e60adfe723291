"""Draft models for speculative decoding (ML-SpecQD, arXiv 2503.13565).

`build_draft_model` casts the target's own projections to a microscaling format (no training, no
extra files): every layer's q/k/v/o and gate/up/down projections are dequantized to float32 and
re-quantized with `mx.quantize(mode=kind)`, while the embedding, the norms, RoPE and an untied
lm_head are the target's own module objects (shared: they cost no extra memory, and keeping the
embedding / lm_head in their stored precision is what keeps the draft's agreement high).
`load_draft_model` loads a separate same-tokenizer model instead. Import `scheduler` first
(OpenBLAS before mlx).
"""

from __future__ import annotations

import re
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

DRAFT_KINDS = ("mxfp4", "nvfp4", "mxfp8")

# (group_size, bits) each mode requires (mx.quantize's table of quantization modes).
_MODE_PARAMS = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
_PROJECTION = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def build_draft_model(target: nn.Module, kind: str) -> nn.Module:
    """A new model of target's class and args: projections re-quantized to `kind`, the rest shared.

    The target is not modified. ValueError for an unknown kind, a kind the default device cannot
    run, or a projection whose input width is not a multiple of the kind's group size.
    """
    _check_kind(kind)
    draft = type(target)(target.args)  # its own random init stays lazy and is dropped below

    def pick(path: str, module: nn.Module) -> nn.Module:
        return _cast_linear(module, kind, path) if _PROJECTION.search(path) else module

    draft.update_modules(tree_map_with_path(pick, target.leaf_modules(), is_leaf=nn.Module.is_module))
    mx.eval(draft.parameters())
    return draft


def load_draft_model(path: str, target_vocab_size: int) -> nn.Module:
    """A separate draft (GGUF file or mlx-lm dir); it must share the target's tokenizer."""
    from scheduler.model import load_model

    loaded = load_model(path)
    if loaded.vocab_size != target_vocab_size:
        raise ValueError(
            f"draft model {path!r} has vocab size {loaded.vocab_size}, the target has {target_vocab_size}: "
            "a draft must use the target's tokenizer")
    return loaded.model


def _check_kind(kind: str) -> None:
    if kind not in _MODE_PARAMS:
        raise ValueError(f"unknown draft kind {kind!r}; expected one of {', '.join(DRAFT_KINDS)}")
    reason = _unsupported_reason(kind, str(mx.default_device()))
    if reason is not None:
        raise ValueError(f"draft kind {kind!r} cannot run on {mx.default_device()}: {reason}")


@lru_cache(maxsize=None)
def _unsupported_reason(kind: str, device: str) -> str | None:
    """None when a float32 quantized matmul in this mode runs on the device, else MLX's error."""
    group_size, bits = _MODE_PARAMS[kind]
    try:
        w = mx.ones((8, group_size * 2), dtype=mx.float32)
        wq, scales = mx.quantize(w, group_size=group_size, bits=bits, mode=kind)
        x = mx.ones((1, group_size * 2), dtype=mx.float32)
        mx.eval(mx.quantized_matmul(x, wq, scales, None, True, group_size, bits, mode=kind))
    except Exception as exc:  # MLX raises RuntimeError / ValueError for modes a backend lacks
        return f"{type(exc).__name__}: {exc}"
    return None


def _float_weight(module: nn.Module) -> mx.array:
    """[O, I] float32 weight of an nn.Linear or nn.QuantizedLinear (any mode)."""
    if isinstance(module, nn.QuantizedLinear):
        return mx.dequantize(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                             bits=module.bits, mode=module.mode, dtype=mx.float32)
    if isinstance(module, nn.Linear):
        return module.weight.astype(mx.float32)
    raise ValueError(f"cannot draft from {type(module).__name__}: expected nn.Linear or nn.QuantizedLinear")


def _cast_linear(module: nn.Module, kind: str, path: str) -> nn.QuantizedLinear:
    group_size, bits = _MODE_PARAMS[kind]
    w = _float_weight(module)  # [O, I]
    if w.shape[1] % group_size:
        raise ValueError(f"{path}: input width {w.shape[1]} is not a multiple of {kind}'s group size {group_size}")
    draft = nn.QuantizedLinear(w.shape[1], w.shape[0], bias=False, group_size=group_size, bits=bits, mode=kind)
    draft.weight, draft.scales = mx.quantize(w, group_size=group_size, bits=bits, mode=kind)
    mx.eval(draft.weight, draft.scales)  # one projection's float32 copy alive at a time
    if "bias" in module:
        draft.bias = module.bias  # shared, as the other float tensors
    return draft
