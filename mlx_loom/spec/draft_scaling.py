"""Activation-aware channel scaling for self-drafts (AWQ, arXiv 2306.00978), folded into the draft.

For a projection y = W x and any positive s, y = (W diag(s)) (x / s). Casting W diag(s) instead of
W moves the format's rounding error off the input channels that carry large activations. With
s = m^alpha (m: mean |x| per input channel on calibration text), the draft gets x / s for free by
folding 1/s into whatever produces x:
  - q/k/v read input_layernorm: the draft's own copy of that norm has weight / s_attn;
  - gate/up read post_attention_layernorm: weight / s_mlp;
  - down reads silu(gate) * up: up_proj's rows (and bias) are divided by s_down before the cast.
o_proj is left unscaled: with GQA its input channels come from value heads shared by several
query heads. In float arithmetic the folded draft equals the target exactly; only the cast differs.

ALPHAS (per draft kind) and CALIBRATION_TOKENS were chosen by teacher-forced agreement with the
target on held-out calibration text (benchmarks/bench_spec_acceptance.py, "scaling strength" table):
the best alpha, and a plain cast (alpha 0) where scaling gained less than 0.01 (mxfp8). Import `scheduler` first (OpenBLAS before mlx).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels.calibration import calibration_tokens
from mlx_loom.kernels.qmm import linear
from mlx_loom.kernels.rope_norm import PLAIN_NORMS

log = logging.getLogger(__name__)

ALPHAS = {"mxfp4": 0.25, "nvfp4": 0.5, "mxfp8": 0.0}
CALIBRATION_TOKENS = 1024
CHUNK = 512
# Pre-norm blocks with plain RMSNorm weights and an MLP of down(silu(gate) * up): the folds above are exact.
SCALED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# projection -> the site whose statistics it records (the other projections only run)
_RECORDED = {"q_proj": "attn", "gate_proj": "mlp", "down_proj": "down"}


@dataclass
class LayerScales:
    """Per-input-channel scales s of one layer (the draft casts W diag(s) and divides inputs by s)."""
    attn: mx.array  # [D]: q/k/v inputs (input_layernorm's output)
    mlp: mx.array   # [D]: gate/up inputs (post_attention_layernorm's output)
    down: mx.array  # [F]: down_proj's input


def scaling_unsupported(model: nn.Module) -> str | None:
    """None when the folds are exact for this model, else why not."""
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    if model_type not in SCALED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {', '.join(sorted(SCALED_MODEL_TYPES))}"
    for i, layer in enumerate(model.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            if type(getattr(layer, norm, None)) not in PLAIN_NORMS:
                return f"layer {i} {norm} is not an nn.RMSNorm"
    return None


def activation_scales(model: nn.Module, tokenizer, alpha: float) -> list[LayerScales] | None:
    """Scales from the model's own activations on calibration text; None for alpha 0 (a plain cast)
    and, logged, for an architecture the folds do not fit."""
    if not alpha:
        return None
    reason = scaling_unsupported(model)
    if reason is not None:
        log.warning("draft: activation-aware scaling not applied (%s); the draft is a plain cast", reason)
        return None
    return scales_from_means(input_means(model, calibration_chunks(tokenizer)), alpha)


def calibration_chunks(tokenizer, num_tokens: int = CALIBRATION_TOKENS) -> list[list[int]]:
    tokens = calibration_tokens(tokenizer, num_tokens)
    return [tokens[i:i + CHUNK] for i in range(0, len(tokens), CHUNK)]


def scales_from_means(means: list[dict[str, mx.array]], alpha: float) -> list[LayerScales] | None:
    """LayerScales from input_means' statistics; None for alpha 0."""
    if not alpha:
        return None
    return [LayerScales(**{site: channel_scales(m, alpha) for site, m in layer.items()}) for layer in means]


def channel_scales(mean_abs: mx.array, alpha: float) -> mx.array:
    """[C] s = m^alpha, normalized so that max(s) * min(s) = 1 (no overall gain moves into the cast)."""
    m = mx.maximum(mean_abs, 1e-3 * mx.mean(mean_abs))  # near-dead channels: bounded scales
    s = mx.power(m, alpha)
    return s / mx.sqrt(mx.max(s) * mx.min(s))


def input_means(model: nn.Module, chunks: Sequence[Sequence[int]]) -> list[dict[str, mx.array]]:
    """Per layer, {site: [C] mean |x| per input channel} of q_proj, gate_proj and down_proj.

    Each chunk runs through the model's own modules (hidden states only, no lm_head), with its
    projections temporarily wrapped; the wrappers are removed before this returns."""
    if not chunks:
        raise ValueError("input_means needs at least one chunk of tokens")
    wrapped = _wrap_projections(model)
    try:
        for chunk in chunks:
            hidden = model.model(mx.array([list(chunk)]))  # [1, L, D]
            mx.eval(hidden, *(w.sums[-1] for _, w, _, _ in wrapped if w.site))
    finally:
        for _, wrapper, parent, name in wrapped:
            setattr(parent, name, wrapper.inner)
    means: list[dict[str, mx.array]] = [{} for _ in model.layers]
    for i, wrapper, _, _ in wrapped:
        if wrapper.site:
            means[i][wrapper.site] = sum(wrapper.sums) / wrapper.count
    return means


class _InputMeans(nn.Module):
    """Runs a projection through mlx_loom.kernels.qmm.linear (native on the CPU); sums |x| per input channel
    when it records a site."""

    def __init__(self, inner: nn.Module, site: str | None) -> None:
        super().__init__()
        self.inner, self.site = inner, site
        self.sums: list[mx.array] = []  # [C] per call
        self.count = 0

    def __call__(self, x: mx.array) -> mx.array:
        if self.site:
            flat = mx.abs(x.reshape(-1, x.shape[-1]).astype(mx.float32))  # [T, C]
            self.sums.append(flat.sum(0))
            self.count += flat.shape[0]
        return linear(self.inner, x)


def _wrap_projections(model: nn.Module) -> list[tuple[int, _InputMeans, nn.Module, str]]:
    """(layer index, wrapper, parent module, attribute name) for every projection, now wrapped."""
    wrapped = []
    for i, layer in enumerate(model.layers):
        for parent, names in ((layer.self_attn, _ATTN), (layer.mlp, _MLP)):
            for name in names:
                wrapper = _InputMeans(getattr(parent, name), _RECORDED.get(name))
                setattr(parent, name, wrapper)
                wrapped.append((i, wrapper, parent, name))
    return wrapped
