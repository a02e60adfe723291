"""What an mlx-lm model needs from the engine, learned from the model itself.

`kv_layout` asks the model's own cache factory (mlx-lm's `make_prompt_cache`) which layers keep
KV and which slide, then runs one lazy forward with recording caches to read each layer's key
and value shapes (MLA layers store a latent and a rope key of different widths). Nothing is
evaluated, so this costs no compute. Models whose per-request state is not only a KV cache (SSM
and linear-attention hybrids) are refused here with a message naming the architecture.

`flattened_llama_reason` is the structural check for the hand-written llama path (and the fused
native decode layer): exactly mlx-lm's llama classes, or qwen3's (a llama block plus per-head
RMSNorms on q and k before RoPE), full attention everywhere. Anything else runs the model's own
code (mlx_loom/worker/generic_forward.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen3
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from mlx_loom.kernels.activations import unrouted_type
from mlx_loom.kernels.rope_norm import PLAIN_NORMS

# The architectures the conformance matrix (tests/test_architectures.py) checks token for token.
TESTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo2", "olmoe", "granite", "granitemoe", "glm4", "cohere", "starcoder2", "mixtral", "deepseek_v2",
    "deepseek_v3", "gpt_oss", "exaone4", "step3p5",
)


@dataclass(frozen=True)
class LayerKV:
    """What one layer stores per token: keys [HKV, Dk] and values [HKV, Dv] (MLA: Dk != Dv)."""

    kv_heads: int
    k_dim: int
    v_dim: int
    window: int | None = None  # sliding-window layers see only the last `window` keys


class UnsupportedModelError(ValueError):
    """The model cannot be served by this engine; the message says why and what is served."""


def model_type(model: nn.Module) -> str:
    args = getattr(model, "args", None)
    return str(getattr(model, "model_type", None) or getattr(args, "model_type", None) or type(model).__module__)


class _ShapeProbe:
    """Stands in for an empty KVCache during the lazy probe forward; records what a layer stores."""

    offset = 0

    def __init__(self, window: int | None) -> None:
        self.window = window
        self.shapes: tuple | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.shapes = (keys.shape, values.shape, keys.dtype)
        self.keys = keys  # mlx-lm's pipeline() ties a stage's send to its last cache's keys
        return keys, values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **_: object) -> mx.array:
        return create_causal_mask(N, window_size=window_size or self.window)


def kv_layout(model: nn.Module) -> tuple[list[LayerKV], mx.Dtype]:
    """Per cache entry: kv heads, key/value widths and sliding window; and the KV dtype."""
    caches = make_prompt_cache(model)
    staged = getattr(getattr(model, "model", None), "pipeline_layers", None)
    if staged is not None:  # mlx-lm's pipeline(): this rank's layers only (earlier ones are None)
        caches = caches[:len(staged)]
    other = sorted({type(c).__name__ for c in caches if type(c) not in (KVCache, RotatingKVCache)})
    if other:
        raise UnsupportedModelError(
            f"architecture {model_type(model)!r} keeps per-request state that is not a KV cache ({', '.join(other)}); "
            f"mlx-loom serves attention-only models: {', '.join(TESTED_ARCHITECTURES)} are tested token for token")
    probes = [_ShapeProbe(c.max_size if isinstance(c, RotatingKVCache) else None) for c in caches]
    model(mx.array([[0, 1]], dtype=mx.int32), cache=probes)  # lazy: shapes only, nothing evaluated
    missing = [i for i, p in enumerate(probes) if p.shapes is None]
    if missing:
        raise UnsupportedModelError(f"architecture {model_type(model)!r}: cache entries {missing} were never "
                                    "written by a forward, so their layers cannot be paged")
    layers = [LayerKV(kv_heads=k[1], k_dim=k[3], v_dim=v[3], window=p.window)
              for p in probes for k, v, _ in [p.shapes]]
    return layers, probes[0].shapes[2]


# Model classes the flattened path computes exactly: (Model, inner model, block, attention, MLP).
_FLATTENED = {
    "llama": (llama.Model, llama.LlamaModel, llama.TransformerBlock, llama.Attention, llama.MLP),
    "qwen3": (qwen3.Model, qwen3.Qwen3Model, qwen3.TransformerBlock, qwen3.Attention, qwen3.MLP),
}


def flattened_llama_reason(model: nn.Module) -> str | None:
    """None when every layer is exactly mlx-lm's llama block (or qwen3's: llama plus q/k RMSNorms)
    with full attention (the hand-written flattened path computes exactly that); otherwise why not."""
    family = next((name for name, classes in _FLATTENED.items()
                   if type(model) is classes[0] and type(model.model) is classes[1]), None)
    if family is None:
        return f"{model_type(model)} is not mlx-lm's llama.Model or qwen3.Model"
    _, _, block, attention, mlp = _FLATTENED[family]
    if any(t != "full_attention" for t in getattr(model.model, "layer_types", ["full_attention"])):
        return "sliding-window layers"
    for layer in model.model.layers:
        kinds = (type(layer), type(layer.self_attn), unrouted_type(layer.mlp), type(layer.input_layernorm),
                 type(layer.post_attention_layernorm))
        if kinds[:3] != (block, attention, mlp) or not set(kinds[3:]) <= set(PLAIN_NORMS):
            return f"layer classes {[k.__name__ for k in kinds]}"
        if family == "qwen3" and not {type(layer.self_attn.q_norm), type(layer.self_attn.k_norm)} <= set(PLAIN_NORMS):
            return "q/k norms are not RMSNorm"
    if type(model.model.norm) not in PLAIN_NORMS:
        return "final norm is not RMSNorm"
    return None
