"""GGUF architectures as mlx-lm models: ModelArgs from the metadata, tensor names to mlx-lm's.

llama.cpp's converter (convert_hf_to_gguf.py) names tensors alike across families
(`blk.N.attn_q.weight`, ...); what differs per family is undone here:
- llama: q/k rows permuted for GGML's pairwise RoPE (only the llama converter does it);
- gemma2/gemma3: every `*norm.weight` stored as (w + 1), since GGML's RMSNorm multiplies by the
  weight as is while Gemma's adds 1 (mlx-lm's Gemma norms add 1 themselves); `ffn_norm` is the
  pre-feedforward norm there, next to `post_attention_norm` / `post_ffw_norm`;
- qwen3moe: experts as 3-D tensors `ffn_{gate,up,down}_exps` (mlx-lm's SwitchGLU layout), the
  router as `ffn_gate_inp`;
- phi3: fused `attn_qkv` and `ffn_up` holding [gate; up] rows, both kept as HF fuses them;
  LongRoPE factors as the `rope_factors_{long,short}` tensors.
Hyperparameters llama.cpp does not store but assumes per family (Gemma 3's sliding-window period 6
and local RoPE base 10000 unless the file says otherwise, Gemma's attention-scale rule, qwen3moe's
renormalised top-k) are assumed the same way here.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.models.layout import UnsupportedModelError
from mlx_loom.models.tokenizer import GGUF_TOKENIZER_MODELS

Meta = Callable[..., Any]  # m(key, default=None): the value of "{arch}.{key}" in the GGUF metadata


@dataclass(frozen=True)
class GgufArch:
    model_type: str  # the mlx-lm module that runs it
    permute_qk: bool = False  # llama.cpp permuted q/k rows for its pairwise RoPE
    norm_shift: float = 0.0  # llama.cpp stored every norm weight plus this
    names: Mapping[str, str] = field(default_factory=dict)  # per-layer names that differ from LAYER_NAMES
    config: Callable[[Meta, Mapping[str, mx.array]], dict] | None = None  # family-specific ModelArgs fields
    linear_rope: bool = False  # its mlx-lm model honours rope_scaling {"rope_type": "linear"}


GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
_GEMMA_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")  # phi3 LongRoPE: config, not weights
_NAME_RE = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases|bias)$")

# llama.cpp's layer counts of the Gemma 27B models, whose attention scale is 1/sqrt(hidden/heads)
# (query_pre_attn_scalar), not 1/sqrt(head_dim): it keys the rule on the layer count, as here.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_SWA_PERIOD = 6  # llama.cpp's default: every 6th Gemma 3 layer global, the others slide
_GEMMA3_LOCAL_ROPE_BASE = 10000.0  # llama.cpp's value for the sliding layers when the file has none


def _meta(metadata: dict, key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    return value.tolist() if hasattr(value, "tolist") else value


def _gemma_attention_scalar(name: str, m: Meta) -> float:
    """Gemma's query_pre_attn_scalar as llama.cpp derives it (the GGUF does not store it)."""
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    if int(m("block_count")) == _GEMMA_27B_LAYERS[name]:
        return hidden / heads
    return float(m("attention.key_length", hidden // heads))


def _qwen3moe(m: Meta, _tensors: Mapping[str, mx.array]) -> dict:
    experts = int(m("expert_count"))
    moe_ff = int(m("expert_feed_forward_length"))
    return dict(
        num_experts=experts,
        num_experts_per_tok=int(m("expert_used_count")),
        moe_intermediate_size=moe_ff,
        intermediate_size=int(m("feed_forward_length", moe_ff)),
        decoder_sparse_step=1,  # llama.cpp's qwen3moe has experts in every layer
        mlp_only_layers=[],
        norm_topk_prob=True,  # llama.cpp always renormalises qwen3moe's top-k weights (its graph hard-codes it)
    )


def _gemma2(m: Meta, _tensors: Mapping[str, mx.array]) -> dict:
    # mlx-lm's gemma2 attends globally in every layer (no sliding window), as from an HF directory.
    return dict(
        query_pre_attn_scalar=_gemma_attention_scalar("gemma2", m),
        attn_logit_softcapping=float(m("attn_logit_softcapping", 50.0)),  # llama.cpp's defaults
        final_logit_softcapping=float(m("final_logit_softcapping", 30.0)),
    )


def _swa_period(m: Meta) -> int:
    """mlx-lm's sliding_window_pattern: layer i is global iff (i + 1) % period == 0.

    As llama.cpp's gemma3 loader: no window means every layer global; else
    `attention.sliding_window_pattern`, a period (default 6) or one bool per layer (true =
    sliding), the latter accepted when it is periodic that way."""
    if not int(m("attention.sliding_window", 0) or 0):
        return 1
    pattern = m("attention.sliding_window_pattern", _GEMMA3_SWA_PERIOD)
    if isinstance(pattern, int) and pattern > 0:
        return pattern
    sliding = [bool(s) for s in pattern] if isinstance(pattern, list) else []
    period = next((i + 1 for i, s in enumerate(sliding) if not s), 0)  # 0: no global layer at all
    if not period or sliding != [(i + 1) % period != 0 for i in range(len(sliding))]:
        raise UnsupportedModelError(f"gemma3 GGUF with sliding-window pattern {pattern} is not supported "
                                    "(mlx-lm's gemma3_text makes every n-th layer global)")
    return period


def _gemma3(m: Meta, _tensors: Mapping[str, mx.array]) -> dict:
    if float(m("final_logit_softcapping", 0.0) or 0.0):
        raise UnsupportedModelError("gemma3 GGUF with final_logit_softcapping is not supported "
                                    "(mlx-lm's gemma3_text has none)")
    return dict(
        query_pre_attn_scalar=_gemma_attention_scalar("gemma3", m),
        sliding_window=int(m("attention.sliding_window", 0) or 0) or 1,
        sliding_window_pattern=_swa_period(m),
        rope_local_base_freq=float(m("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)),
        rope_theta=float(m("rope.freq_base", 1_000_000.0)),
    )


def _phi3(m: Meta, tensors: Mapping[str, mx.array]) -> dict:
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = hidden // heads  # phi3 has no separate head_dim
    config = dict(partial_rotary_factor=int(m("rope.dimension_count", head_dim)) / head_dim)
    long, short = (tensors.get(name) for name in ROPE_FACTORS)
    if long is not None and short is not None:
        # LongRoPE (su): llama.cpp keeps its per-frequency factors as tensors; mlx-lm's phi3 takes them in
        # rope_scaling (its SuScaledRoPE applies the long ones at every length, as for the HF checkpoint)
        # and derives the attention factor itself: only files whose factor is that one (not YaRN's) are read.
        _check_longrope_attn_factor(m)
        config["rope_scaling"] = {"type": "longrope", "long_factor": long.astype(mx.float32).tolist(),
                                  "short_factor": short.astype(mx.float32).tolist()}
        config["original_max_position_embeddings"] = int(m("rope.scaling.original_context_length"))
    return config


def _check_longrope_attn_factor(m: Meta) -> None:
    orig, ctx = int(m("rope.scaling.original_context_length")), int(m("context_length"))
    expected = math.sqrt(1 + math.log(ctx / orig) / math.log(orig)) if ctx > orig else 1.0
    stored = float(m("rope.scaling.attn_factor", expected))
    if abs(stored - expected) > 1e-5 * expected:
        raise UnsupportedModelError(f"phi3 GGUF with RoPE attention factor {stored} is not supported (mlx-lm's "
                                    f"phi3 LongRoPE uses {expected:.6f}; YaRN-scaled phi3 is not read)")


ARCHS = {
    "llama": GgufArch("llama", permute_qk=True, linear_rope=True),  # also Mistral: converted as llama
    "qwen2": GgufArch("qwen2", linear_rope=True),
    "qwen3": GgufArch("qwen3", linear_rope=True),
    "qwen3moe": GgufArch("qwen3_moe", config=_qwen3moe),
    "gemma2": GgufArch("gemma2", norm_shift=1.0, names=_GEMMA_NAMES, config=_gemma2),
    "gemma3": GgufArch("gemma3_text", norm_shift=1.0, names=_GEMMA_NAMES, config=_gemma3, linear_rope=True),
    "phi3": GgufArch("phi3", names={"ffn_up": "mlp.gate_up_proj"}, config=_phi3),
}


def gguf_arch(metadata: dict) -> tuple[str, GgufArch]:
    name = str(_meta(metadata, "general.architecture", "llama"))
    if name not in ARCHS:
        raise UnsupportedModelError(f"GGUF architecture {name!r} is not supported; GGUF files of "
                                    f"{', '.join(ARCHS)} (llama includes Mistral) are, and any mlx-lm "
                                    "architecture as an mlx-lm or Hugging Face directory")
    tokenizer = str(_meta(metadata, "tokenizer.ggml.model", "gpt2"))
    if tokenizer not in GGUF_TOKENIZER_MODELS:  # refused before any weight is read
        raise UnsupportedModelError(f"GGUF tokenizer model {tokenizer!r} is not supported; byte-level BPE "
                                    "('gpt2') and SentencePiece ('llama') vocabularies are")
    return name, ARCHS[name]


def _rope_scaling(name: str, arch: GgufArch, m: Meta) -> dict | None:
    """rope_scaling from `rope.scaling.*`: linear where the mlx-lm model takes it; others refused by name.
    (phi3's LongRoPE comes as tensors instead, see _phi3.)"""
    kind = str(m("rope.scaling.type", "none") or "none")
    if kind == "none" or (kind == "longrope" and name == "phi3"):
        return None
    if kind == "linear" and arch.linear_rope:
        return {"rope_type": "linear", "factor": float(m("rope.scaling.factor"))}
    raise UnsupportedModelError(f"{name} GGUF with RoPE scaling {kind!r} is not supported")


def build_model(metadata: dict, tensors: Mapping[str, mx.array]) -> tuple[nn.Module, Any, GgufArch]:
    """The mlx-lm Model (random weights) for this GGUF's architecture, its args, and the arch.
    `tensors`: the file's tensors by GGUF name (for shapes, tying and phi3's RoPE factors)."""
    name, arch = gguf_arch(metadata)
    m: Meta = lambda key, default=None: _meta(metadata, f"{name}.{key}", default)  # noqa: E731
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    config = dict(
        model_type=arch.model_type,
        hidden_size=hidden,
        num_hidden_layers=int(m("block_count")),
        intermediate_size=int(m("feed_forward_length", 0)),
        num_attention_heads=heads,
        num_key_value_heads=int(m("attention.head_count_kv", heads)),
        head_dim=int(m("attention.key_length", hidden // heads)),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        # the embedding's rows, not the token list: converters may pad or trim either
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        max_position_embeddings=int(m("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_scaling=_rope_scaling(name, arch, m),
    )
    if arch.config is not None:
        config.update(arch.config(m, tensors))
    module = importlib.import_module(f"mlx_lm.models.{arch.model_type}")
    args = module.ModelArgs.from_dict(config)
    return module.Model(args), args, arch


def mlx_name(gguf_name: str, arch: GgufArch) -> str:
    match = _NAME_RE.match(gguf_name)
    layer, base, kind = match.groups() if match else (None, None, None)
    table = {**LAYER_NAMES, **arch.names} if layer is not None else GLOBAL_NAMES
    if base not in table:
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r} for mlx-lm {arch.model_type}")
    prefix = f"model.layers.{layer}." if layer is not None else ""
    return f"{prefix}{table[base]}.{kind}"


def unshift_norm(mlx_param: str, w: mx.array, arch: GgufArch) -> mx.array:
    """Undo the converter's `norm.weight + shift` (float32, as llama.cpp keeps norms in F32)."""
    if arch.norm_shift and mlx_param.endswith("norm.weight"):
        return w.astype(mx.float32) - arch.norm_shift
    return w

