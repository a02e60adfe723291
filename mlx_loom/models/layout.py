"""What an mlx-lm model needs from the engine, learned from the model itself.

`model_layout` asks the model's own cache factory (mlx-lm's `make_prompt_cache`) which cache
entries keep KV (and which of those slide) and which keep recurrent state (`ArraysCache`: conv
windows, SSM / linear-attention states of SSM and linear-attention hybrids), then runs one lazy
forward with recording caches to read each KV layer's key and value shapes (MLA layers store a
latent and a rope key of different widths) and each state entry's per-request shape and dtype.
Nothing is evaluated, so this costs no compute. A `CacheList` in one layer entry is split into its
members, each paged as its own kind: a state and a KV cache (falcon_h1's parallel Mamba and
attention, baichuan_m1's k/v conv window beside its attention) or one KV cache per attention
sublayer (longcat_flash). Cache layouts the engine does not page (other `CacheList`s,
`ChunkedKVCache`, anything else), and models whose own code would not give mlx-lm's tokens over
pages (a mask wider than the cache's window, positions taken from a cache array's length), are
refused here with the real reason.

`flattened_llama_reason` is the structural check for the hand-written llama path (and the fused
native decode layer): exactly mlx-lm's llama classes, or qwen3's (a llama block plus per-head
RMSNorms on q and k before RoPE), full attention everywhere. Anything else runs the model's own
code (mlx_loom/worker/generic_forward.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen3, recurrent_gemma
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import ArraysCache, CacheList, ChunkedKVCache, KVCache, RotatingKVCache, make_prompt_cache

from mlx_loom.kernels.activations import unrouted_type
from mlx_loom.kernels.mlx_lm_classes import mlx_lm_classes
from mlx_loom.kernels.rope_norm import PLAIN_NORMS

# The architectures the conformance matrix (tests/test_architectures.py) checks token for token.
TESTED_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo2", "olmoe", "granite", "granitemoe", "glm4", "cohere", "starcoder2", "mixtral", "deepseek_v2",
    "deepseek_v3", "gpt_oss", "exaone4", "step3p5",
    "gemma4_text", "olmo3", "ministral3", "mistral4", "glm4_moe", "glm4_moe_lite", "seed_oss", "cohere2",
    "llama4_text", "minimax", "exaone_moe", "bailing_moe", "afmoe", "smollm3", "apertus", "ernie4_5", "ernie4_5_moe",
    "hunyuan_v1_dense", "hunyuan", "helium", "nanbeige", "dots1", "internlm3", "minicpm", "phimoe", "exaone",
    "stablelm", "mimo", "nemotron", "solar_open", "youtu_llm", "mimo_v2_flash", "telechat3", "laguna",
    "iquestloopcoder", "mellum", "deepseek", "glm", "internlm2", "phi", "qwen", "gpt2", "gpt_neox", "gpt_bigcode",
    "minicpm3", "Klear", "nemotron-nas", "nanochat", "talkie", "spark2_5", "muse_glimmer", "dbrx", "longcat_flash",
    "gemma3n", "openelm", "lille-130m",
)
# Hybrids with recurrent state (ArraysCache entries) the matrix checks token for token.
TESTED_HYBRIDS = ("qwen3_5", "qwen3_5_moe", "qwen3_next", "lfm2", "lfm2_moe", "nemotron_h", "granitemoehybrid",
                  "jamba", "mamba", "mamba2", "rwkv7", "kimi_linear", "plamo2", "olmo_hybrid", "bailing_moe_linear",
                  "bailing_hybrid", "recurrent_gemma", "bailing_moe_v3", "kimi_k3", "falcon_h1", "baichuan_m1")


@dataclass(frozen=True)
class LayerKV:
    """What one layer stores per token: keys [HKV, Dk] and values [HKV, Dv] (MLA: Dk != Dv)."""

    kv_heads: int
    k_dim: int
    v_dim: int
    window: int | None = None  # sliding-window layers see only the last `window` keys


@dataclass(frozen=True)
class LayerState:
    """One recurrent-state cache entry (an mlx-lm ArraysCache): per request, array e has shape shapes[e]."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[mx.Dtype, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of one request's state for this entry."""
        return sum(math.prod(s) * d.size for s, d in zip(self.shapes, self.dtypes))


Entry = tuple[str, "int | tuple[Entry, ...]"]


@dataclass(frozen=True)
class ModelLayout:
    """What the engine keeps per request: paged KV layers, state entries, and which cache entry is which."""

    kv: tuple[LayerKV, ...]
    states: tuple[LayerState, ...]
    entries: tuple[Entry, ...]
    """Per cache entry of the model, in order: ("kv", index into kv), ("state", index into states) or
    ("list", its members' entries) for a CacheList."""
    dtype: mx.Dtype
    """The dtype the model's own attention produces K/V in (its activations' dtype without attention)."""


# Model classes whose recurrent layers treat a missing state (None) otherwise than a zero state, so a row
# that starts its sequence cannot share a call with rows that continue theirs: recurrent_gemma's RG-LRU
# skips the input normalisation of a sequence's first token only when its state is None.
_FRESH_STATE_APART = (recurrent_gemma.Model,)


def fresh_state_apart(model: nn.Module) -> bool:
    """True when rows starting their sequence need calls of their own (exactly a listed class)."""
    return type(model) in _FRESH_STATE_APART


class UnsupportedModelError(ValueError):
    """The model cannot be served by this engine; the message says why and what is served."""


def model_args(model: nn.Module) -> object:
    """The model's ModelArgs: `args`, or `config` where the class keeps them there (youtu_llm, plamo3)."""
    args = getattr(model, "args", None)
    return args if args is not None else getattr(model, "config", None)


def model_type(model: nn.Module) -> str:
    args = model_args(model)
    return str(getattr(model, "model_type", None) or getattr(args, "model_type", None) or type(model).__module__)


class _ShapeProbe:
    """Stands in for an empty KVCache during the lazy probe forward; records what a layer stores."""

    offset = 0

    def __init__(self, window: int | None) -> None:
        self.window = window
        self.shapes: tuple | None = None
        self.mask_window: int | None = None  # the window the model's own mask asks of this cache
        self.read_whole = False  # the model read the whole cache (keys_and_values), not update_and_fetch's return

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.shapes = (keys.shape, values.shape, keys.dtype)
        self.keys = keys  # mlx-lm's pipeline() ties a stage's send to its last cache's keys
        self.values = values
        return keys, values

    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        self.read_whole = True  # gemma3n's KV-sharing and afm7's KV-reuse layers read another layer's cache
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **_: object) -> mx.array:
        self.mask_window = window_size
        return create_causal_mask(N, window_size=window_size or self.window)


def kv_layout(model: nn.Module) -> tuple[list[LayerKV], mx.Dtype]:
    """Per KV cache entry: kv heads, key/value widths and sliding window; and the KV dtype."""
    layout = model_layout(model)
    return list(layout.kv), layout.dtype


def prompt_cache(model: nn.Module) -> list:
    """mlx-lm's own cache for the model (`make_prompt_cache`), cut to this rank's layers under its pipeline()."""
    caches = make_prompt_cache(model)
    staged = getattr(getattr(model, "model", None), "pipeline_layers", None)
    if staged is not None:  # mlx-lm's pipeline(): this rank's layers only (earlier ones are None)
        caches = caches[:len(staged)]
    return caches


def model_layout(model: nn.Module) -> ModelLayout:
    """The KV layers and state entries of the model's own cache, learned from one lazy forward."""
    caches = prompt_cache(model)
    _refuse_unpaged(model, caches)
    probes = [_probe(c) for c in caches]
    out = model(mx.array([[0, 1]], dtype=mx.int32), cache=probes)  # lazy: shapes only, nothing evaluated
    missing = [i for i, p in enumerate(probes) if any(_unwritten(x) for x in _members(p))]
    if missing:
        raise UnsupportedModelError(f"architecture {model_type(model)!r}: cache entries {missing} were never "
                                    "written by a forward, so their layers cannot be paged")
    _refuse_unpageable_reads(model, [x for p in probes for x in _members(p) if isinstance(x, _ShapeProbe)])
    kv: list[LayerKV] = []
    states: list[LayerState] = []
    entries = tuple(_record(p, kv, states) for p in probes)
    dtype = next((x.shapes[2] for p in probes for x in _members(p) if isinstance(x, _ShapeProbe)), out.dtype)
    return ModelLayout(tuple(kv), tuple(states), entries, dtype)


def _probe(c: object) -> object:
    """A recording stand-in for one cache entry of the model (CacheList: one for each member)."""
    if isinstance(c, CacheList):
        return CacheList(*(_probe(x) for x in c.caches))
    if isinstance(c, ArraysCache):
        return ArraysCache(len(c.cache))
    return _ShapeProbe(c.max_size if isinstance(c, RotatingKVCache) else None)


def _members(p: object) -> tuple:
    return tuple(p.caches) if isinstance(p, CacheList) else (p,)


def _unwritten(p: object) -> bool:
    return p.shapes is None if isinstance(p, _ShapeProbe) else any(a is None for a in p.cache)


def _record(p: object, kv: list[LayerKV], states: list[LayerState]) -> Entry:
    """The entry of one probe after the forward, appending its KV layer or state entry to kv / states."""
    if isinstance(p, CacheList):
        return ("list", tuple(_record(x, kv, states) for x in p.caches))
    if isinstance(p, _ShapeProbe):
        (k, v, _) = p.shapes
        kv.append(LayerKV(kv_heads=k[1], k_dim=k[3], v_dim=v[3], window=p.window))
        return ("kv", len(kv) - 1)
    # [1, ...] per array: one request's state
    states.append(LayerState(tuple(tuple(a.shape[1:]) for a in p.cache), tuple(a.dtype for a in p.cache)))
    return ("state", len(states) - 1)



# Model classes whose CacheList of KVCaches holds one cache per attention sublayer, each used only through
# the cache protocol (offset, update_and_fetch, make_mask), read from their source: each becomes a paged KV
# layer. Other CacheLists of KVCaches keep a lightning indexer's keys and read the arrays directly.
_KV_LISTS = mlx_lm_classes("longcat_flash")
# Model classes that read a layer's keys_and_values() under the mask of that layer's type and take positions
# from the cache's offset (gemma3n's KV-sharing layers), read from their source: served over pages.
_WHOLE_CACHE_READERS = mlx_lm_classes("gemma3n")


def _refuse_unpaged(model: nn.Module, caches: list) -> None:
    """UnsupportedModelError naming the real reason for a cache entry the engine does not page."""
    name = model_type(model)
    for c in caches:
        if isinstance(c, CacheList) and all(type(x) is KVCache for x in c.caches) and type(model) in _KV_LISTS:
            continue
        if isinstance(c, CacheList) and all(type(x) is KVCache for x in c.caches):
            raise UnsupportedModelError(
                f"architecture {name!r} keeps two key caches per layer (CacheList: the attention's plus a "
                "lightning indexer's) and its attention reads the cache's key array directly; the paged pools "
                "expose neither, so it is not served")
        if isinstance(c, CacheList):
            kinds = [type(x) for x in c.caches]
            if set(kinds) <= {ArraysCache, KVCache, RotatingKVCache} and ArraysCache in kinds:
                continue  # a state and a KV cache in one layer entry: each member paged as its own kind
            raise UnsupportedModelError(
                f"architecture {name!r} keeps a CacheList of {', '.join(k.__name__ for k in kinds)} in one layer "
                "entry; the engine splits only a CacheList of recurrent state (ArraysCache) and KV caches, so "
                "it is not served")
        if isinstance(c, ChunkedKVCache):
            raise UnsupportedModelError(
                f"architecture {name!r} uses chunked attention (ChunkedKVCache: each query sees only the keys of "
                "its own attention chunk) and builds that mask from one offset for the whole batch, so rows at "
                "different positions cannot share a step; it is not served")
        if type(c) not in (KVCache, RotatingKVCache, ArraysCache):
            raise UnsupportedModelError(
                f"architecture {name!r} keeps per-request state of a kind the engine does not page "
                f"({type(c).__name__}); served: attention-only models ({', '.join(TESTED_ARCHITECTURES)}) and "
                f"hybrids with ArraysCache state ({', '.join(TESTED_HYBRIDS)}), tested token for token")


def _refuse_unpageable_reads(model: nn.Module, probes: list[_ShapeProbe]) -> None:
    """UnsupportedModelError where the model's own code reads its KV caches in a way pages cannot give
    mlx-lm's tokens: a sliding layer's mask wider than what its RotatingKVCache keeps (plamo3: a mask of
    window + 1 over a cache of window, so mlx-lm's own prefill sees more keys than its decode), or a
    whole cache read outside update_and_fetch by a class not known to mask its padding (afm7)."""
    if any(p.read_whole for p in probes) and type(model) not in _WHOLE_CACHE_READERS:
        raise UnsupportedModelError(
            f"architecture {model_type(model)!r} reads a layer's whole cache outside its attention's "
            "update_and_fetch (keys_and_values); over pages that array is padded past each row's keys, which only "
            "classes known to mask it by position handle (gemma3n's KV-sharing layers; afm7's KV-reuse layers "
            "instead place their queries by the array's length), so it is not served")
    for p in probes:
        if p.window is not None and (p.mask_window or 0) > p.window:
            raise UnsupportedModelError(
                f"architecture {model_type(model)!r} masks its sliding layers to {p.mask_window} keys but keeps "
                f"{p.window} in their cache (RotatingKVCache), so mlx-lm's own prefill lets a query see "
                f"{p.mask_window} keys where its decode sees {p.window}; no one paged window reproduces both, so "
                "it is not served")


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
