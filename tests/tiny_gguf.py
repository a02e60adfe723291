"""Write a tiny mlx-lm model (tests/tiny_archs.py) as a GGUF file the way llama.cpp's converter
(convert_hf_to_gguf.py) does for its family: tensor names from gguf-py's own TensorNameMap (not
from mlx_loom's table), llama's q/k row permutation, Gemma's norms stored as (w + 1), MoE experts
as 3-D `*_exps` tensors, phi3's LongRoPE factors as tensors, the family's `{arch}.*` metadata, a
byte-level BPE vocabulary with token types and a chat template. F32 tensors, or Q8_0 for the
projection weights (2-D, and 3-D experts)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from tiny_archs import SLIDING_WINDOW
from tiny_model import CHAT_TEMPLATE, SPECIAL_TOKENS, _byte_tokenizer

Q8 = gguf.GGMLQuantizationType.Q8_0


def _no_params(w: gguf.GGUFWriter, args) -> None:
    return None


def _moe_params(w: gguf.GGUFWriter, args) -> None:  # Qwen2MoeModel / TextModel.set_gguf_parameters
    w.add_expert_count(args.num_experts)
    w.add_expert_used_count(args.num_experts_per_tok)
    w.add_expert_feed_forward_length(args.moe_intermediate_size)


def _gemma2_params(w: gguf.GGUFWriter, args) -> None:  # Gemma2Model.set_gguf_parameters
    w.add_attn_logit_softcapping(args.attn_logit_softcapping)
    w.add_final_logit_softcapping(args.final_logit_softcapping)
    w.add_sliding_window(SLIDING_WINDOW)  # the config's (mlx-lm's gemma2 attends globally; ModelArgs drops it)


def _gemma3_params(w: gguf.GGUFWriter, args) -> None:  # Gemma3Model.set_gguf_parameters
    if args.sliding_window_pattern != 1:
        w.add_sliding_window(args.sliding_window)
    if args.sliding_window_pattern not in (1, 6):
        # llama.cpp assumes 6 for gemma3 unless told: the per-layer key its loader reads (true = sliding)
        w.add_sliding_window_pattern([(i + 1) % args.sliding_window_pattern != 0
                                      for i in range(args.num_hidden_layers)])
    if args.rope_local_base_freq != 10000.0:
        w.add_rope_freq_base_swa(args.rope_local_base_freq)  # newer converters write it from rope_parameters
    if args.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling["factor"])


def _phi3_params(w: gguf.GGUFWriter, args) -> None:  # Phi3MiniModel.set_gguf_parameters
    w.add_rope_dimension_count(int(args.partial_rotary_factor * args.hidden_size) // args.num_attention_heads)
    w.add_rope_scaling_orig_ctx_len(args.original_max_position_embeddings)
    w.add_sliding_window(0)
    if args.rope_scaling:  # Phi3MiniModel.generate_extra_tensors
        scale = args.max_position_embeddings / args.original_max_position_embeddings
        orig = args.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))


def _phi3_tensors(args) -> dict[str, np.ndarray]:
    if not args.rope_scaling:
        return {}
    return {"rope_factors_long.weight": np.array(args.rope_scaling["long_factor"], np.float32),
            "rope_factors_short.weight": np.array(args.rope_scaling["short_factor"], np.float32)}


@dataclass(frozen=True)
class SpmVocab:
    """A SentencePiece vocabulary as llama.cpp's `_set_vocab_sentencepiece` writes it."""
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    add_space_prefix: bool | None = None  # None: key absent (llama.cpp's default, true); Gemma writes False
    chat_template: str | None = None


def spm_vocab(processor, vocab_size: int, *, add_space_prefix: bool | None = None,
              user_defined: tuple[str, ...] = ()) -> SpmVocab:
    """llama.cpp's `_create_vocab_sentencepiece`: pieces, scores and types, padded to the model's vocab.
    `user_defined`: pieces typed USER_DEFINED (the converter does so for tokenizer_config.json's
    non-special added tokens; the .model's own user-defined pieces it types NORMAL)."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores, types = [-10000.0] * vocab_size, [int(gguf.TokenType.UNUSED)] * vocab_size
    for i in range(min(processor.vocab_size(), vocab_size)):
        tokens[i], scores[i] = processor.IdToPiece(i), processor.GetScore(i)
        kind = gguf.TokenType.NORMAL
        if processor.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif processor.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif processor.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif processor.IsByte(i):
            kind = gguf.TokenType.BYTE
        elif tokens[i] in user_defined:
            kind = gguf.TokenType.USER_DEFINED
        types[i] = int(kind)
    return SpmVocab(tokens, scores, types, bos=processor.bos_id(), eos=processor.eos_id(), unk=processor.unk_id(),
                    add_space_prefix=add_space_prefix)


@dataclass(frozen=True)
class ArchWriter:
    gguf_arch: gguf.MODEL_ARCH
    pre: str = "default"  # tokenizer.ggml.pre
    params: Callable[[gguf.GGUFWriter, object], None] = _no_params
    norm_shift: float = 0.0  # Gemma: the converter adds 1 to every *norm.weight
    permute_qk: bool = False  # llama: the converter permutes q/k rows
    extra_tensors: Callable[[object], dict[str, np.ndarray]] = lambda args: {}


WRITERS: dict[str, ArchWriter] = {
    "llama": ArchWriter(gguf.MODEL_ARCH.LLAMA, "llama-bpe", permute_qk=True),
    "qwen2": ArchWriter(gguf.MODEL_ARCH.QWEN2, "qwen2"),
    "qwen3": ArchWriter(gguf.MODEL_ARCH.QWEN3, "qwen2"),
    "qwen3moe": ArchWriter(gguf.MODEL_ARCH.QWEN3MOE, "qwen2", _moe_params),
    "gemma2": ArchWriter(gguf.MODEL_ARCH.GEMMA2, params=_gemma2_params, norm_shift=1.0),
    "gemma3": ArchWriter(gguf.MODEL_ARCH.GEMMA3, params=_gemma3_params, norm_shift=1.0),
    "phi3": ArchWriter(gguf.MODEL_ARCH.PHI3, params=_phi3_params, extra_tensors=_phi3_tensors),
}


def _hf_name(name: str) -> str:
    """mlx-lm's stacked experts are what the converter merges HF's per-expert tensors into."""
    return name.replace(".mlp.switch_mlp.", ".mlp.experts.")


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute of q/k rows (HF -> GGUF)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(size: int) -> tuple[list[str], list[int]]:
    vocab = _byte_tokenizer().get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens]
    pad = size - len(tokens)  # the model's embedding has more rows than the tokenizer has tokens
    return tokens + [f"[PAD{i}]" for i in range(pad)], [int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * pad


def _write_hparams(w: gguf.GGUFWriter, args) -> None:
    """TextModel.set_gguf_parameters: what every family writes."""
    heads = args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    w.add_block_count(args.num_hidden_layers)
    w.add_context_length(getattr(args, "max_position_embeddings", 8192))  # gemma2's args drop it
    w.add_embedding_length(args.hidden_size)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)


def _write_spm_vocab(w: gguf.GGUFWriter, vocab: SpmVocab) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos)
    w.add_eos_token_id(vocab.eos)
    w.add_unk_token_id(vocab.unk)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _write_vocab(w: gguf.GGUFWriter, pre: str, vocab_size: int) -> None:
    tokens, types = _vocab(vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(SPECIAL_TOKENS.index("<|im_start|>"))
    w.add_eos_token_id(SPECIAL_TOKENS.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _tensor(name: str, value: mx.array, spec: ArchWriter, args) -> np.ndarray:
    arr = np.array(value.astype(mx.float32))
    if spec.norm_shift and name.endswith("norm.weight"):
        arr = arr + spec.norm_shift
    if spec.permute_qk and ".q_proj." in name:
        arr = _permute(arr, args.num_attention_heads)
    elif spec.permute_qk and ".k_proj." in name:
        arr = _permute(arr, args.num_key_value_heads)
    return arr


def write_gguf(model: nn.Module, arch: str, path: str | Path, *, q8: bool = False,
               spm: SpmVocab | None = None, edit: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """`arch`: a WRITERS key; any other name is written as qwen3 under that `general.architecture`.
    `spm`: a SentencePiece vocabulary instead of the tiny byte-level BPE one. `edit`: a last change
    to the metadata (a key written again replaces the converter's value)."""
    args = model.args
    spec = WRITERS.get(arch, WRITERS["qwen3"])
    names = gguf.get_tensor_name_map(spec.gguf_arch, args.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    _write_hparams(w, args)
    spec.params(w, args)
    if edit is not None:
        edit(w)
    if spm is not None:
        _write_spm_vocab(w, spm)
    else:
        _write_vocab(w, spec.pre, args.vocab_size)
    for name, value in tree_flatten(model.parameters()):
        arr = _tensor(name, value, spec, args)
        gguf_name = names.get_name(_hf_name(name), try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if q8 and arr.ndim >= 2 and name.endswith("proj.weight"):
            w.add_tensor(gguf_name, gguf.quants.quantize(arr, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(gguf_name, arr)
    for gguf_name, arr in spec.extra_tensors(args).items():
        w.add_tensor(gguf_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
