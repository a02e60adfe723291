"""GGUF architectures as mlx-lm models: ModelArgs from the metadata, tensor names to mlx-lm's.

llama.cpp's converters name tensors alike across these families (`blk.N.attn_q.weight`, ...);
what differs is the metadata prefix (`{arch}.block_count`), biases (qwen2), q/k norms (qwen3)
and llama's q/k row permutation (only the llama converter interleaves RoPE halves).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlx_loom.scheduler.model_layout import UnsupportedModelError


@dataclass(frozen=True)
class GgufArch:
    model_type: str  # the mlx-lm module that runs it
    permute_qk: bool  # llama.cpp permuted q/k rows for its pairwise RoPE


ARCHS = {
    "llama": GgufArch("llama", True),  # also Mistral: llama.cpp converts it as llama
    "qwen2": GgufArch("qwen2", False),
    "qwen3": GgufArch("qwen3", False),
}

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME_RE = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|scales|biases|bias)$")


def _meta(metadata: dict, key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    return value.item() if hasattr(value, "item") else value


def gguf_arch(metadata: dict) -> tuple[str, GgufArch]:
    name = str(_meta(metadata, "general.architecture", "llama"))
    if name not in ARCHS:
        raise UnsupportedModelError(f"GGUF architecture {name!r} is not supported; GGUF files of "
                                    f"{', '.join(ARCHS)} (llama includes Mistral) are, and any mlx-lm "
                                    "architecture as an mlx-lm or Hugging Face directory")
    return name, ARCHS[name]


def build_model(metadata: dict, tied: bool) -> tuple[nn.Module, Any, GgufArch]:
    """The mlx-lm Model (random weights) for this GGUF's architecture, its args, and the arch."""
    name, arch = gguf_arch(metadata)
    m = lambda key, default=None: _meta(metadata, f"{name}.{key}", default)  # noqa: E731
    hidden, heads = int(m("embedding_length")), int(m("attention.head_count"))
    config = dict(
        model_type=arch.model_type,
        hidden_size=hidden,
        num_hidden_layers=int(m("block_count")),
        intermediate_size=int(m("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(m("attention.head_count_kv", heads)),
        head_dim=int(m("attention.key_length", hidden // heads)),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        vocab_size=len(metadata["tokenizer.ggml.tokens"]),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        max_position_embeddings=int(m("context_length", 4096)),
        tie_word_embeddings=tied,
    )
    module = importlib.import_module(f"mlx_lm.models.{arch.model_type}")
    args = module.ModelArgs.from_dict(config)
    return module.Model(args), args, arch


def mlx_name(gguf_name: str) -> str:
    match = _NAME_RE.match(gguf_name)
    layer, base, kind = match.groups() if match else (None, None, None)
    table = LAYER_NAMES if layer is not None else GLOBAL_NAMES
    if base not in table:
        raise UnsupportedModelError(f"unexpected GGUF tensor {gguf_name!r}")
    prefix = f"model.layers.{layer}." if layer is not None else ""
    return f"{prefix}{table[base]}.{kind}"
