"""Draft models for speculative decoding (ML-SpecQD, arXiv 2503.13565).

`build_draft_model` casts the target's own projections to a microscaling format (no training, no
extra files): every layer's q/k/v/o and gate/up/down projections are dequantized to float32 and
re-quantized with `mx.quantize(mode=kind)`, while the embedding, the norms, RoPE and an untied
lm_head are the target's own module objects (shared: they cost no extra memory, and keeping the
embedding / lm_head in their stored precision is what keeps the draft's agreement high; a 16-bit
head gets the draft's own 8-bit copy, `DRAFT_HEAD_BITS`, which agrees as well). Given
per-layer activation scales (mlx_loom/spec/draft_scaling.py), the cast weights are W diag(s) and the
1/s is folded into the draft's own copies of the two per-layer norms and into up_proj's rows.
`load_draft_model` loads a separate same-tokenizer model instead. Import `scheduler` first
(OpenBLAS before mlx).
"""

from __future__ import annotations

import re
from dataclasses import is_dataclass, replace
from functools import lru_cache
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from mlx_loom.models.routing import route_model
from mlx_loom.spec.draft_scaling import LayerScales

DRAFT_KINDS = ("mxfp4", "nvfp4", "mxfp8")
DRAFT_HEAD_BITS = 8
"""Bits of the draft's own affine copy of a 16-bit LM head. Teacher-forced top-1 agreement of the
MXFP4 draft of the float16 default model with its target on held-out calibration text: 0.667 with
the shared float16 head, 0.667 with an 8-bit copy (group 32), 0.624 with 4 bits, 0.457 with MXFP4;
the 8-bit head is read in ~2/3 of the float16 one's time here."""

# (group_size, bits) each mode requires (mx.quantize's table of quantization modes).
_MODE_PARAMS = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
_PROJECTION = re.compile(r"(^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)$")
_NORM = re.compile(r"(^|\.)layers\.(\d+)\.(input_layernorm|post_attention_layernorm)$")
# projection -> (LayerScales field scaling its input columns, field dividing its output rows)
_FOLDS = {"q_proj": ("attn", None), "k_proj": ("attn", None), "v_proj": ("attn", None), "o_proj": (None, None),
          "gate_proj": ("mlp", None), "up_proj": ("mlp", "down"), "down_proj": ("down", None)}
_NORM_SITE = {"input_layernorm": "attn", "post_attention_layernorm": "mlp"}


def build_draft_model(target: nn.Module, kind: str, scales: Sequence[LayerScales] | None = None,
                      head_bits: int | None = None) -> nn.Module:
    """A new model of target's class and args: projections re-quantized to `kind`, the rest shared.

    scales (one per layer, from draft_scaling.activation_scales): cast W diag(s) and fold 1/s into
    the draft's own per-layer norms and up_proj rows; None: a plain cast with every norm shared.
    head_bits (8 or 4): the draft gets its own affine copy of the LM head (the tied embedding's or
    lm_head's weights, group 32), read by every draft token instead of the target's 16-bit one; the
    draft only proposes, so the target's verification keeps the output exact. None: the head is
    shared; so is it for a class with no separate lm_head or a head that is already that small.
    The target is not modified. ValueError for an unknown kind, a kind the default device cannot
    run, or a projection whose input width is not a multiple of the kind's group size.
    """
    _check_kind(kind)
    if scales is not None and len(scales) != len(target.layers):
        raise ValueError(f"{len(scales)} layer scales for a target with {len(target.layers)} layers")
    head = _head_weight(target) if head_bits else None
    # Its own random init stays lazy and is dropped below; with a head of its own it is untied.
    draft = type(target)(target.args if head is None else replace(target.args, tie_word_embeddings=False))
    if head is not None and "lm_head" not in draft:  # a class with no separate head: share the target's
        head, draft = None, type(target)(target.args)

    def pick(path: str, module: nn.Module) -> nn.Module:
        if (m := _PROJECTION.search(path)) and m.group(4) in _FOLDS:
            return _cast_linear(module, kind, path, *_fold_scales(scales, int(m.group(2)), m.group(4)))
        if scales is not None and (m := _NORM.search(path)):
            return _scaled_norm(module, getattr(scales[int(m.group(2))], _NORM_SITE[m.group(3)]))
        return module

    draft.update_modules(tree_map_with_path(pick, target.leaf_modules(), is_leaf=nn.Module.is_module))
    if head is not None:
        draft.lm_head = _affine_head(head, head_bits)
    mx.eval(draft.parameters())
    route_model(draft)  # the cast projections and the draft's own norms run the native kernels
    return draft


def _head_weight(target: nn.Module) -> mx.array | None:
    """[V, D] weights of the target's LM head (the embedding's when tied), as stored, or None to share it:
    an architecture without a separate lm_head when untied, or a head stored in 8 bits or fewer already."""
    args = getattr(target, "args", None)
    if not is_dataclass(args) or not hasattr(args, "tie_word_embeddings") or not hasattr(target, "model"):
        return None
    module = target.model.embed_tokens if args.tie_word_embeddings else getattr(target, "lm_head", None)
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return None  # a quantized head (the default GGUF's): no cheaper copy to make
    if not isinstance(module, (nn.Linear, nn.Embedding)) or "bias" in module:
        return None
    return module.weight


def _affine_head(w: mx.array, bits: int, rows: int = 4096) -> nn.QuantizedLinear:
    """The draft's own head: w [V, D] in MLX's affine format with float32 scales (the native qmm kernels
    read it), cast `rows` rows at a time so that no float32 copy of the whole head is ever alive."""
    parts = []
    for i in range(0, w.shape[0], rows):
        parts.append(mx.quantize(w[i : i + rows].astype(mx.float32), group_size=32, bits=bits))
        mx.eval(parts[-1])
    head = nn.QuantizedLinear(w.shape[1], w.shape[0], bias=False, group_size=32, bits=bits)
    head.weight, head.scales, head.biases = (mx.concatenate([p[j] for p in parts]) for j in range(3))
    return head


def load_draft_model(path: str, target_vocab_size: int) -> nn.Module:
    """A separate draft (GGUF file or mlx-lm dir); it must share the target's tokenizer."""
    from mlx_loom.models.loader import load_model

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
        return module.weight
    raise ValueError(f"cannot draft from {type(module).__name__}: expected nn.Linear or nn.QuantizedLinear")


def _fold_scales(scales: Sequence[LayerScales] | None, layer: int,
                 name: str) -> tuple[mx.array | None, mx.array | None]:
    """(input column scales, output row divisors) of one projection; (None, None) for a plain cast."""
    if scales is None:
        return None, None
    cols, rows = _FOLDS[name]
    return (None if cols is None else getattr(scales[layer], cols),
            None if rows is None else getattr(scales[layer], rows))


def _cast_linear(module: nn.Module, kind: str, path: str, cols: mx.array | None = None,
                 rows: mx.array | None = None) -> nn.Module:
    """The projection cast to `kind`: weight diag(1/rows) W diag(cols) (bias / rows), else as is."""
    group_size, _ = _MODE_PARAMS[kind]
    w = _float_weight(module)  # [O, I]
    if w.shape[1] % group_size:
        raise ValueError(f"{path}: input width {w.shape[1]} is not a multiple of {kind}'s group size {group_size}")
    bias = module.get("bias")  # shared, as the other float tensors, unless its rows are scaled
    if cols is not None:
        w = w * cols[None, :]
    if rows is not None:
        w = w / rows[:, None]
        bias = None if bias is None else (bias.astype(mx.float32) / rows).astype(bias.dtype)
    return _quantized_linear(w, bias, kind)


def _quantized_linear(w: mx.array, bias: mx.array | None, kind: str) -> nn.Module:
    """nn.QuantizedLinear holding w [O, I] cast to `kind` (the tests swap in a float twin)."""
    group_size, bits = _MODE_PARAMS[kind]
    draft = nn.QuantizedLinear(w.shape[1], w.shape[0], bias=False, group_size=group_size, bits=bits, mode=kind)
    draft.weight, draft.scales = mx.quantize(w, group_size=group_size, bits=bits, mode=kind)
    mx.eval(draft.weight, draft.scales)  # one projection's float32 copy alive at a time
    if bias is not None:
        draft.bias = bias
    return draft


def _scaled_norm(norm: nn.Module, s: mx.array) -> nn.RMSNorm:
    """The draft's own copy of an RMSNorm whose output is divided by s [D]."""
    out = nn.RMSNorm(norm.weight.shape[0], eps=norm.eps)
    out.weight = (norm.weight.astype(mx.float32) / s).astype(norm.weight.dtype)
    return out
