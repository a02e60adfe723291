"""Write a tiny mlx-lm model (tests/tiny_archs.py) as a GGUF file the way llama.cpp's converter does:
its tensor names, llama's q/k row permutation, `{arch}.*` metadata, the byte-level BPE vocabulary
with token types, a chat template. F32 tensors, or Q8_0 for the 2-D projection weights."""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_loom.scheduler.gguf_arch import GLOBAL_NAMES, LAYER_NAMES
from tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, _byte_tokenizer

_TO_GGUF = {v: k for k, v in {**GLOBAL_NAMES, **LAYER_NAMES}.items()}
_PRE = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2"}


def _gguf_name(name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight"""
    module, kind = name.rsplit(".", 1)
    if module.startswith("model.layers."):
        layer, rest = module[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{_TO_GGUF[rest]}.{kind}"
    return f"{_TO_GGUF[module]}.{kind}"


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of q/k rows (HF -> GGUF)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(size: int) -> tuple[list[str], list[int]]:
    vocab = _byte_tokenizer().get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    pad = size - len(tokens)  # the model's embedding has more rows than the tokenizer has tokens
    return tokens + [f"<unused{i}>" for i in range(pad)], [int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * pad


def write_gguf(model: nn.Module, arch: str, path: str | Path, *, q8: bool = False) -> Path:
    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.num_hidden_layers)
    w.add_context_length(args.max_position_embeddings)
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    tokens, types = _vocab(args.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_PRE.get(arch, "default"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(SPECIAL_TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(SPECIAL_TOKENS.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, value in tree_flatten(model.parameters()):
        arr = np.array(value.astype(mx.float32))
        if arch == "llama" and ".q_proj." in name:
            arr = _permute(arr, heads)
        elif arch == "llama" and ".k_proj." in name:
            arr = _permute(arr, kv_heads)
        if q8 and arr.ndim == 2 and name.endswith("proj.weight"):
            w.add_tensor(_gguf_name(name), gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(_gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
