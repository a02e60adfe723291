"""Tiny random-weight mlx-lm checkpoints for many architectures, loadable offline by `mlx_lm.load`.

`ARCHS` maps a case name to the config.json fields that differ from a shared tiny base (hidden 64,
4 heads, 2 kv heads, head_dim 16, vocab 320); each entry names its `model_type`, which may differ
from the case name (e.g. "gemma3_text_untied"). `make_tiny_arch_dir` builds the mlx-lm Model, gives
it non-degenerate random weights and writes config.json, model.safetensors and the byte-level
tokenizer of tiny_model.py. Layers that alternate sliding and full attention use a window of 8, so
windows matter at ~40 tokens. `HYBRIDS` names the cases whose cache is not only KV (recurrent or
conv state next to attention).

Weights: matrices N(0, 1/fan_in) times 2 and q/k norms doubled, so attention is not flat and each
sublayer outweighs its residual input; embeddings N(0, 1) under an own lm_head but N(0, 1/hidden)
when tied, else greedy decoding echoes the current token; norm weights and biases get noise. With
these, greedy decoding of 24 tokens gives well over 4 distinct tokens for every case and seed tried.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model

from tiny_model import SPECIAL_TOKENS, _byte_tokenizer, _tokenizer_config

SLIDING_WINDOW = 8
_NOISE = 0.1  # relative noise on norm weights, absolute noise on biases
_GAIN = 2.0  # on N(0, 1/fan_in) matrices: sublayers outweigh the residual input, attention is not flat
_QK_NORM_GAIN = 2.0  # the same sharpening where q and k are normalised
_QK_NORMS = frozenset({"q_norm", "k_norm", "q_layernorm", "k_layernorm"})

_BASE: dict = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 320,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
    "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
    "bos_token_id": SPECIAL_TOKENS.index("<|im_start|>"),
    "pad_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
}
_MOE: dict = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_GRANITE: dict = {
    "logits_scaling": 2.0, "attention_multiplier": 0.125, "embedding_multiplier": 2.0,
    "residual_multiplier": 0.8, "attention_bias": False, "mlp_bias": False,
}
_GEMMA3: dict = {  # layers 2 and 5 global, the rest slide
    "model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": SLIDING_WINDOW, "sliding_window_pattern": 3,
    "query_pre_attn_scalar": 16, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
}
_MLA: dict = {
    "num_hidden_layers": 3, "num_key_value_heads": 4, "first_k_dense_replace": 1, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32, "kv_lora_rank": 32,
    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "tie_word_embeddings": False,
}

ARCHS: dict[str, dict] = {
    "llama": {"model_type": "llama"},
    "mistral": {"model_type": "mistral", "sliding_window": None, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2"},
    "qwen3": {"model_type": "qwen3"},
    "qwen2_moe": {"model_type": "qwen2_moe", **_MOE, "shared_expert_intermediate_size": 64,
                  "tie_word_embeddings": False},
    "qwen3_moe": {"model_type": "qwen3_moe", **_MOE, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "norm_topk_prob": True, "tie_word_embeddings": False},
    "gemma": {"model_type": "gemma"},
    "gemma2": {"model_type": "gemma2", "num_hidden_layers": 4, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16, "sliding_window": SLIDING_WINDOW},
    "gemma3_text": {**_GEMMA3},  # tied: no lm_head.weight saved, so its sanitize drops the head
    "gemma3_text_untied": {**_GEMMA3, "tie_word_embeddings": False},
    "phi3": {"model_type": "phi3", "tie_word_embeddings": False},
    "olmo2": {"model_type": "olmo2", "tie_word_embeddings": False},
    "olmoe": {"model_type": "olmoe", "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
              "norm_topk_prob": False, "tie_word_embeddings": False},
    "granite": {"model_type": "granite", **_GRANITE},
    "granitemoe": {"model_type": "granitemoe", **_GRANITE, "num_local_experts": 4, "num_experts_per_tok": 2,
                   "intermediate_size": 64},  # its quant_predicate packs "*mlp.down_proj" (experts too) at group 64
    "glm4": {"model_type": "glm4", "attention_bias": True, "partial_rotary_factor": 0.5,
             "tie_word_embeddings": False},
    "cohere": {"model_type": "cohere", "layer_norm_eps": 1e-5, "logit_scale": 0.5, "use_qk_norm": False},
    "starcoder2": {"model_type": "starcoder2", "norm_epsilon": 1e-5},
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                "tie_word_embeddings": False},
    "deepseek_v2": {"model_type": "deepseek_v2", **_MLA, "q_lora_rank": None, "topk_method": "greedy",
                    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}},
    "deepseek_v3": {"model_type": "deepseek_v3", **_MLA, "q_lora_rank": 32, "topk_method": "noaux_tc",
                    "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
                    "routed_scaling_factor": 2.5},
    "gpt_oss": {"model_type": "gpt_oss", "num_hidden_layers": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
                "intermediate_size": 32, "sliding_window": SLIDING_WINDOW,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                 "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
                "layer_types": ["sliding_attention", "full_attention"] * 2, "tie_word_embeddings": False},
    "exaone4": {"model_type": "exaone4", "num_hidden_layers": 4, "sliding_window": SLIDING_WINDOW,
                "sliding_window_pattern": "LLLG", "rope_scaling": None,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    "qwen3_next": {"model_type": "qwen3_next", "num_hidden_layers": 4, "full_attention_interval": 2,
                   "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                   "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, **_MOE, "decoder_sparse_step": 1,
                   "mlp_only_layers": [], "shared_expert_intermediate_size": 32, "partial_rotary_factor": 0.25,
                   "norm_topk_prob": True, "tie_word_embeddings": False},
    # Step-3.5: layer 0 a dense MLP, layer 1 MoE with a shared expert; both MLPs clamp (swiglu limits)
    "step3p5": {"model_type": "step3p5", "num_attention_groups": 2, "moe_layers_enum": "1", "moe_num_experts": 4,
                "moe_top_k": 2, "moe_intermediate_size": 32, "share_expert_dim": 64, "sliding_window": SLIDING_WINDOW,
                "layer_types": ["sliding_attention", "full_attention"], "swiglu_limits": [0.0, 10.0],
                "swiglu_limits_shared": [10.0, 10.0], "tie_word_embeddings": False},
    "lfm2": {"model_type": "lfm2", "num_hidden_layers": 4, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3,
             "block_dim": 64, "block_ff_dim": 128, "block_multiple_of": 32, "block_ffn_dim_multiplier": 1.0,
             "block_auto_adjust_ff_dim": False, "layer_types": ["conv", "conv", "full_attention", "conv"]},
    "qwen3_5": {"model_type": "qwen3_5", "num_hidden_layers": 4, "full_attention_interval": 2,
                "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4,
                "rope_parameters": {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
    "nemotron_h": {"model_type": "nemotron_h", "hybrid_override_pattern": ["M", "*", "-", "M"],
                   "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False, "ssm_state_size": 16,
                   "conv_kernel": 4, "n_groups": 2, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False,
                   "use_conv_bias": True, "attention_bias": False, "tie_word_embeddings": False},
    "granitemoehybrid": {"model_type": "granitemoehybrid", **_GRANITE, "num_hidden_layers": 3,
                         "layer_types": ["mamba", "attention", "mamba"], "mamba_n_heads": 8, "mamba_d_head": 16,
                         "mamba_proj_bias": False, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_n_groups": 2,
                         "mamba_conv_bias": True, "shared_intermediate_size": 128, "position_embedding_type": "rope"},
    "mamba2": {"model_type": "mamba2", "num_heads": 8, "head_dim": 16, "state_size": 16, "conv_kernel": 4,
               "n_groups": 2, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
               "time_step_limit": [0.001, 100.0], "time_step_rank": "auto"},
    "qwen3_5_moe": {"model_type": "qwen3_5_moe", "num_hidden_layers": 4, "full_attention_interval": 2,
                    "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                    "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, **_MOE,
                    "shared_expert_intermediate_size": 32, "tie_word_embeddings": False,
                    "rope_parameters": {"type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
    "jamba": {"model_type": "jamba", "num_hidden_layers": 4, "attn_layer_offset": 1, "attn_layer_period": 2,
              "expert_layer_offset": 1, "expert_layer_period": 2, "mamba_d_conv": 4, "mamba_d_state": 16,
              "mamba_expand": 2, "num_experts": 4, "num_experts_per_tok": 2},
    "lfm2_moe": {"model_type": "lfm2_moe", "num_hidden_layers": 4, "norm_eps": 1e-5, "conv_bias": False,
                 "conv_L_cache": 3, **_MOE, "norm_topk_prob": True, "use_expert_bias": True, "num_dense_layers": 1,
                 "layer_types": ["conv", "conv", "full_attention", "conv"]},
    "rwkv7": {"model_type": "rwkv7", "norm_eps": 1e-5, "a_low_rank_dim": 16, "v_low_rank_dim": 16,
              "gate_low_rank_dim": 16, "decay_low_rank_dim": 16},
    # Kimi-Linear: layers 0, 2 Kimi delta attention (kda_layers count from 1), 1, 3 MLA; layers 1-3 MoE
    "kimi_linear": {"model_type": "kimi_linear", "num_hidden_layers": 4, "model_max_length": 256,
                    "linear_attn_config": {"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16,
                                           "short_conv_kernel_size": 4},
                    "num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 32,
                    "num_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32,
                    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "tie_word_embeddings": False},
    # PLaMo 2: Mamba layers 0 and 2, attention layers 1 and 3
    "plamo2": {"model_type": "plamo2", "num_hidden_layers": 4, "hidden_size_per_head": 16, "mamba_num_heads": 4,
               "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_step": 2, "mamba_chunk_size": 16,
               "attention_window_size": 256},
    # OLMo hybrid: gated delta-net layers 0 and 2, attention layers 1 and 3
    "olmo_hybrid": {"model_type": "olmo_hybrid", "num_hidden_layers": 4, "linear_num_key_heads": 2,
                    "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                    "linear_conv_kernel_dim": 4, "linear_allow_neg_eigval": True, "attention_bias": False,
                    "layer_types": ["linear_attention", "full_attention"] * 2, "tie_word_embeddings": False},
    # Ling-linear: gated linear attention (GLA) layers 0 and 2, attention 1 and 3 (layer_group_size 2); MoE after 0
    "bailing_moe_linear": {"model_type": "bailing_moe_linear", "num_hidden_layers": 4, **_MOE,
                           "num_shared_experts": 1, "norm_topk_prob": True, "first_k_dense_replace": 1,
                           "layer_group_size": 2, "group_norm_size": 2, "use_qk_norm": True,
                           "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "topk_group": 1,
                           "partial_rotary_factor": 0.5, "tie_word_embeddings": False},
    # Ling-2.5 hybrid: GLA layers 0 and 2, MLA layers 1 and 3
    "bailing_hybrid": {"model_type": "bailing_hybrid", "num_hidden_layers": 4, **_MOE, "num_shared_experts": 1,
                       "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "layer_group_size": 2,
                       "group_norm_size": 2, "routed_scaling_factor": 2.5, "kv_lora_rank": 32,
                       "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "q_lora_rank": None,
                       "tie_word_embeddings": False},
    # RecurrentGemma (Griffin): RG-LRU layers 0 and 1, local attention (window 8, one KV head) layer 2
    "recurrent_gemma": {"model_type": "recurrent_gemma", "num_hidden_layers": 3, "attention_bias": False,
                        "conv1d_width": 4, "logits_soft_cap": 30.0, "num_key_value_heads": 1,
                        "attention_window_size": SLIDING_WINDOW,
                        "block_types": ["recurrent", "recurrent", "attention"]},
    # Ling-2.5 (bailing_moe_v3): Kimi delta attention layers 0 and 2, MLA layers 1 and 3; MoE after layer 0
    "bailing_moe_v3": {"model_type": "bailing_moe_v3", "num_hidden_layers": 4, **_MOE,
                       "moe_shared_expert_intermediate_size": 32, "num_shared_experts": 1, "n_group": 1,
                       "topk_group": 1, "first_k_dense_replace": 1, "layer_group_size": 2, "q_lora_rank": 32,
                       "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                       "short_conv_kernel_size": 4, "tie_word_embeddings": False},
    # Kimi K3 (text model in text_config): Kimi delta attention layers 0 and 2, MLA 1 and 3, attention residuals
    "kimi_k3": {"model_type": "kimi_k3", "tie_word_embeddings": False, "text_config": {
        **{k: _BASE[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "rms_norm_eps",
                                 "vocab_size", "max_position_embeddings")},
        "model_type": "kimi_linear", "num_hidden_layers": 4, "num_key_value_heads": 4,
        "linear_attn_config": {"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16, "short_conv_kernel_size": 4},
        "attn_res_block_size": 2, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "num_experts": 4, "num_experts_per_token": 2,
        "moe_intermediate_size": 32, "num_shared_experts": 1, "first_k_dense_replace": 1,
        "tie_word_embeddings": False}},
    # Falcon-H1: every layer runs Mamba-2 and attention side by side (CacheList of an SSM state and a KV cache)
    "falcon_h1": {"model_type": "falcon_h1", "mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16,
                  "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_d_conv": 4, "tie_word_embeddings": False},
    # Baichuan-M1: a 2-tap conv over keys and values (its state in an ArraysCache) before each layer's attention;
    # layer 1 slides (window 8)
    "baichuan_m1": {"model_type": "baichuan_m1", "num_hidden_layers": 2, "conv_window": 2,
                    "sliding_window_layers": [1], "sliding_window": SLIDING_WINDOW, "num_swa_attention_heads": 4,
                    "num_swa_key_value_heads": 2, "tie_word_embeddings": False},
    "mamba": {"model_type": "mamba", "state_size": 16, "conv_kernel": 4, "use_bias": False, "use_conv_bias": True,
              "time_step_rank": 8},
    # issue 31: attention-only architectures mlx-lm 0.32 added
    # Gemma 4 E2B/E4B-style: per-layer inputs, and the last two layers read the KV of the last earlier layer of
    # their type (no cache of their own); full layers have their own head width and partial proportional RoPE
    "gemma4_text": {"model_type": "gemma4_text", "num_hidden_layers": 6, "num_kv_shared_layers": 2,
                    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 320, "global_head_dim": 32,
                    "sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"] * 3,
                    "tie_word_embeddings": False},
    # Gemma 4 26B/31B-style: full layers share K and V (attention_k_eq_v) over their own kv heads, MoE next to the MLP
    "gemma4_text_moe": {"model_type": "gemma4_text", "num_hidden_layers": 4, "num_kv_shared_layers": 0,
                        "hidden_size_per_layer_input": 0, "global_head_dim": 32, "attention_k_eq_v": True,
                        "num_global_key_value_heads": 1, "enable_moe_block": True, "num_experts": 4,
                        "top_k_experts": 2, "moe_intermediate_size": 32, "sliding_window": SLIDING_WINDOW,
                        "layer_types": ["sliding_attention", "full_attention"] * 2, "tie_word_embeddings": False},
    "olmo3": {"model_type": "olmo3", "num_hidden_layers": 4, "sliding_window": SLIDING_WINDOW,
              "tie_word_embeddings": False},  # layers 0-2 slide, layer 3 full
    # Ministral 3: its attention scale grows with floor(position / 16) (llama_4_scaling_beta)
    "ministral3": {"model_type": "ministral3", "tie_word_embeddings": False, "rope_parameters": {
        "rope_type": "yarn", "type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5,
        "rope_theta": 10000.0}},
    "mistral4": {"model_type": "mistral4", **_MLA, "q_lora_rank": 32, "norm_topk_prob": True, "n_group": 1,
                 "topk_group": 1, "routed_scaling_factor": 2.5, "rope_parameters": {
                     "rope_type": "yarn", "type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "llama_4_scaling_beta": 0.5, "rope_theta": 10000.0}},
    "glm4_moe": {"model_type": "glm4_moe", "num_hidden_layers": 3, **_MOE, "n_routed_experts": 4,
                 "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "n_group": 1,
                 "topk_group": 1, "routed_scaling_factor": 2.5, "rope_scaling": None, "use_qk_norm": True,
                 "attention_bias": True, "partial_rotary_factor": 0.5, "tie_word_embeddings": False},
    "glm4_moe_lite": {"model_type": "glm4_moe_lite", **_MLA, "q_lora_rank": 32, "num_experts_per_tok": 2},
    "seed_oss": {"model_type": "seed_oss", "attention_bias": True, "tie_word_embeddings": False},
    "cohere2": {"model_type": "cohere2", "num_hidden_layers": 4, "layer_norm_eps": 1e-5, "logit_scale": 0.5,
                "sliding_window": SLIDING_WINDOW, "sliding_window_pattern": 2},
    "llama4_text": {"model_type": "llama4_text", "num_hidden_layers": 4, "intermediate_size_mlp": 128,
                    "no_rope_layers": [1, 1, 1, 0], "use_qk_norm": True},
    "minimax": {"model_type": "minimax", "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                "shared_intermediate_size": 0, "rotary_dim": 8, "tie_word_embeddings": False},
    "exaone_moe": {"model_type": "exaone_moe", "num_hidden_layers": 4, **_MOE, "num_shared_experts": 1,
                   "sliding_window": SLIDING_WINDOW, "is_moe_layer": [False, True, True, True],
                   "layer_types": ["sliding_attention"] * 3 + ["full_attention"], "tie_word_embeddings": False},
    "bailing_moe": {"model_type": "bailing_moe", **_MOE, "num_shared_experts": 1, "norm_topk_prob": True,
                    "first_k_dense_replace": 1, "use_qk_norm": True, "partial_rotary_factor": 0.5,
                    "moe_router_enable_expert_bias": True, "score_function": "sigmoid", "topk_group": 1,
                    "tie_word_embeddings": False},
    "afmoe": {"model_type": "afmoe", "num_hidden_layers": 4, **_MOE, "num_shared_experts": 1, "num_dense_layers": 1,
              "sliding_window": SLIDING_WINDOW, "tie_word_embeddings": False,
              "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
    # more of mlx-lm 0.32's attention-only models
    "smollm3": {"model_type": "smollm3", "num_hidden_layers": 4, "tie_word_embeddings": False},  # layer 3: no RoPE
    "apertus": {"model_type": "apertus", "mlp_bias": False, "attention_bias": False, "post_norm": False,
                "qk_norm": True, "tie_word_embeddings": False},
    "ernie4_5": {"model_type": "ernie4_5", "use_bias": False, "tie_word_embeddings": False},
    "ernie4_5_moe": {"model_type": "ernie4_5_moe", "num_hidden_layers": 3, "use_bias": False,
                     "tie_word_embeddings": False, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32,
                     "moe_layer_start_index": 1, "moe_num_shared_experts": 1, "moe_use_aux_free": True},
    "hunyuan_v1_dense": {"model_type": "hunyuan_v1_dense", "use_qk_norm": True, "tie_word_embeddings": False},
    # Hunyuan-Large: cross-layer attention (odd layers reuse the even layer's projected K/V), MoE with a shared MLP
    "hunyuan": {"model_type": "hunyuan", "num_hidden_layers": 4, "attention_bias": False, "moe_topk": 2,
                "num_experts": 4, "num_shared_expert": 1, "use_mixed_mlp_moe": True, "use_qk_norm": True,
                "use_cla": True, "cla_share_factor": 2, "moe_intermediate_size": 32, "tie_word_embeddings": False,
                "rope_scaling": {"type": "dynamic", "alpha": 2.0, "factor": 1.0}},
    "helium": {"model_type": "helium", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False},
    "nanbeige": {"model_type": "nanbeige", "num_loops": 2, "tie_word_embeddings": False},  # the stack runs twice
    "dots1": {"model_type": "dots1", "num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_intermediate_size": 32,
              "n_routed_experts": 4, "n_shared_experts": 1, "norm_topk_prob": True, "num_experts_per_tok": 2,
              "routed_scaling_factor": 2.5, "scoring_func": "noaux_tc", "tie_word_embeddings": False},
    "internlm3": {"model_type": "internlm3", "qkv_bias": True, "bias": True, "tie_word_embeddings": False},
    "minicpm": {"model_type": "minicpm", "dim_model_base": 32, "scale_depth": 1.4, "scale_emb": 4.0,
                "tie_word_embeddings": False},
    "phimoe": {"model_type": "phimoe", "num_local_experts": 4, "num_experts_per_tok": 2, "rope_scaling": None,
               "tie_word_embeddings": False},
    "exaone": {"model_type": "exaone", "num_layers": 2, "layer_norm_epsilon": 1e-5},
    "stablelm": {"model_type": "stablelm", "use_qkv_bias": True, "partial_rotary_factor": 0.25, "layer_norm_eps": 1e-5,
                 "qk_layernorm": True, "tie_word_embeddings": False},
    "mimo": {"model_type": "mimo", "num_nextn_predict_layers": 0, "tie_word_embeddings": False},
    "nemotron": {"model_type": "nemotron", "hidden_act": "relu2", "norm_eps": 1e-5, "tie_word_embeddings": False},
    "solar_open": {"model_type": "solar_open", "num_hidden_layers": 3, "moe_intermediate_size": 32,
                   "n_shared_experts": 1, "n_routed_experts": 4, "routed_scaling_factor": 2.5, "num_experts_per_tok": 2,
                   "first_k_dense_replace": 1, "norm_topk_prob": True, "partial_rotary_factor": 0.5,
                   "tie_word_embeddings": False},
    "youtu_llm": {"model_type": "youtu_llm", "num_key_value_heads": 4, "kv_lora_rank": 32, "q_lora_rank": 32,
                  "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "tie_word_embeddings": False},
    # MiMo-V2-Flash: sliding layers with their own head counts, widths and RoPE base; attention sinks; MoE
    "mimo_v2_flash": {"model_type": "mimo_v2_flash", "num_hidden_layers": 4, "hybrid_layer_pattern": [1, 0, 1, 1],
                      "moe_layer_freq": [0, 1, 1, 1], "add_swa_attention_sink_bias": True,
                      "add_full_attention_sink_bias": False, "sliding_window_size": SLIDING_WINDOW,
                      "moe_intermediate_size": 32, "n_shared_experts": None, "n_routed_experts": 4,
                      "num_experts_per_tok": 2, "routed_scaling_factor": None, "topk_method": "noaux_tc",
                      "scoring_func": "sigmoid", "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
                      "layernorm_epsilon": 1e-5, "swa_rope_theta": 10000.0, "swa_num_attention_heads": 4,
                      "swa_num_key_value_heads": 4, "v_head_dim": 8, "swa_head_dim": 16, "swa_v_head_dim": 8,
                      "partial_rotary_factor": 0.5, "attention_value_scale": 0.7, "tie_word_embeddings": False},
    "telechat3": {"model_type": "telechat3", "tie_word_embeddings": False},
    # Laguna: per-layer head counts, softplus output gates, sliding layers with their own RoPE
    "laguna": {"model_type": "laguna", "num_hidden_layers": 3, "sliding_window": SLIDING_WINDOW,
               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
               "num_attention_heads_per_layer": [4, 2, 4], **_MOE, "shared_expert_intermediate_size": 32,
               "tie_word_embeddings": False},
    # IQuest-Loop-Coder: the stack runs twice; the second loop attends to the first loop's KV and a window of its own
    "iquestloopcoder": {"model_type": "iquestloopcoder", "loop_num": 2, "loop_window_size": SLIDING_WINDOW,
                        "tie_word_embeddings": False},
    "mellum": {"model_type": "mellum", "num_hidden_layers": 2, **_MOE, "norm_topk_prob": True,
               "sliding_window": SLIDING_WINDOW, "layer_types": ["sliding_attention", "full_attention"],
               "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
               "tie_word_embeddings": False},
    "deepseek": {"model_type": "deepseek", "num_hidden_layers": 3, "moe_intermediate_size": 32, "n_shared_experts": 1,
                 "n_routed_experts": 4, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
                 "tie_word_embeddings": False},
    "glm": {"model_type": "glm", "attention_bias": True, "tie_word_embeddings": False},
    "internlm2": {"model_type": "internlm2", "bias": False},
    "phi": {"model_type": "phi", "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5, "tie_word_embeddings": False},
    "qwen": {"model_type": "qwen", "kv_channels": 16, "layer_norm_epsilon": 1e-5, "no_bias": True,
             "num_key_value_heads": 4, "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 256,
             "layer_norm_epsilon": 1e-5},
    "gpt_neox": {"model_type": "gpt_neox", "layer_norm_eps": 1e-5, "rotary_emb_base": 10000, "rotary_pct": 0.25},
    "gpt_bigcode": {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_inner": 128, "n_head": 4,
                    "n_positions": 256, "layer_norm_epsilon": 1e-5},
    "minicpm3": {"model_type": "minicpm3", "dim_model_base": 32, "num_key_value_heads": 4, "q_lora_rank": 32,
                 "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "kv_lora_rank": 32, "scale_depth": 1.4,
                 "scale_emb": 4.0, "tie_word_embeddings": False,
                 "rope_scaling": {"type": "longrope", "original_max_position_embeddings": 32,
                                  "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.0, 2.0, 4.0, 8.0]}},
    "Klear": {"model_type": "Klear", "attention_bias": False, "mlp_only_layers": [0], "num_experts": 4,
              "num_experts_per_tok": 2, "decoder_sparse_step": 1, "n_shared_experts": 1, "moe_intermediate_size": 32,
              "norm_topk_prob": True, "tie_word_embeddings": False},
    # Nemotron-NAS: per-block attention group sizes, a no-op attention block and a linear one
    "nemotron-nas": {"model_type": "nemotron-nas", "num_hidden_layers": 3, "block_configs": [
        {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.5}},
        {"attention": {"no_op": True}, "ffn": {"ffn_mult": 1.0}},
        {"attention": {"n_heads_in_group": 4}, "ffn": {"replace_with_linear": True}}]},
    "nanochat": {"model_type": "nanochat", "num_key_value_heads": 4, "tie_word_embeddings": False},
    "talkie": {"model_type": "talkie"},
    "spark2_5": {"model_type": "spark2_5", "num_hidden_layers": 4, "sliding_window": SLIDING_WINDOW,
                 "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                 "tie_word_embeddings": False},
    "muse_glimmer": {"model_type": "muse_glimmer", "num_hidden_layers": 4, "sliding_window": SLIDING_WINDOW,
                     "qk_scale_factor": 2.0, "output_multiplier": 0.5, "tie_word_embeddings": False},
    "dbrx": {"model_type": "dbrx", "d_model": 64, "n_layers": 2, "n_heads": 4,
             "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2}, "tie_word_embeddings": False},
    # LongCat-Flash: two MLA attention sublayers per layer, each with its own cache (a CacheList of two KVCaches),
    # and zero experts (identity) among the routed ones
    "longcat_flash": {"model_type": "longcat_flash", "attention_method": "MLA", "zero_expert_type": "identity",
                      "ffn_hidden_size": 64, "moe_topk": 2, "expert_ffn_hidden_size": 32, "n_routed_experts": 4,
                      "zero_expert_num": 2, "num_layers": 2, "kv_lora_rank": 32, "q_lora_rank": 32,
                      "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "routed_scaling_factor": 2.0,
                      "mla_scale_q_lora": True, "mla_scale_kv_lora": True, "attention_bias": False,
                      "tie_word_embeddings": False},
    # OpenELM: per-layer query / kv head counts and MLP widths
    "openelm": {"model_type": "openelm", "head_dim": 16, "num_transformer_layers": 2, "model_dim": 64,
                "ffn_dim_divisor": 32, "num_query_heads": [4, 2], "num_kv_heads": [2, 1],
                "ffn_multipliers": [2.0, 1.5]},
    "lille-130m": {"model_type": "lille-130m", "block_size": 256, "layer_norm_eps": 1e-5, "n_embd": 64, "n_head": 4,
                   "n_kv_heads": 2, "n_layer": 2},
    # Gemma 3n (E2B/E4B): its config nests the text model's; the last two layers read the KV of the last earlier
    # layer of their type (keys_and_values), AltUp streams, LAuReL, per-layer inputs, sparse activations
    "gemma3n": {"model_type": "gemma3n", "text_config": {
        **{k: v for k, v in _BASE.items() if k not in ("tie_word_embeddings", "eos_token_id", "bos_token_id",
                                                      "pad_token_id", "rope_theta")},
        "model_type": "gemma3n_text", "num_hidden_layers": 6, "num_kv_shared_layers": 2,
        "vocab_size_per_layer_input": 320,
        "sliding_window": SLIDING_WINDOW, "rope_local_base_freq": 10000.0, "rope_theta": 1000000.0,
        "final_logit_softcapping": 30.0, "layer_types": ["sliding_attention", "full_attention"] * 3,
        "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0, 0.0, 0.0], "hidden_size_per_layer_input": 16,
        "altup_num_inputs": 4, "altup_coef_clip": 120.0, "altup_correct_scale": True, "altup_active_idx": 0,
        "laurel_rank": 8}},
}

# Cases whose cache is not only KV: recurrent state (ArraysCache) beside, or instead of, attention.
HYBRIDS: frozenset[str] = frozenset({"qwen3_next", "lfm2", "qwen3_5", "nemotron_h", "granitemoehybrid", "mamba2",
                                     "qwen3_5_moe", "jamba", "mamba", "lfm2_moe", "rwkv7",
                                     "kimi_linear", "plamo2", "olmo_hybrid", "bailing_moe_linear", "bailing_hybrid",
                                     "recurrent_gemma", "bailing_moe_v3", "kimi_k3", "falcon_h1", "baichuan_m1"})


def arch_config(case: str) -> dict:
    """The full config.json dict of a case: the tiny base with the case's overrides."""
    return {**_BASE, **ARCHS[case]}


def _noise(shape: tuple[int, ...]) -> mx.array:
    return mx.random.uniform(-1.0, 1.0, shape)


def _init_norm(path: str, key: str, w: mx.array) -> mx.array:
    if key == "bias":
        return _NOISE * _noise(w.shape)
    base = w if mx.any(w != 0).item() else mx.ones_like(w)  # zero-initialised placeholders (cohere) mean 1
    if path.rsplit(".", 1)[-1] in _QK_NORMS:
        base = _QK_NORM_GAIN * base
    return base * (1.0 + _NOISE * _noise(w.shape))


def _init_array(path: str, module: nn.Module, key: str, w: mx.array, tied: bool) -> mx.array:
    """A random value for one parameter: O(1) activations, sharp enough attention, every norm/bias relevant."""
    if "Norm" in type(module).__name__:  # RMSNorm, LayerNorm, gemma (1 + w) norms, cohere LayerNorm2D
        return _init_norm(path, key, w)
    if key == "bias":
        return w + _NOISE * _noise(w.shape)
    if isinstance(module, nn.Embedding):  # a tied head must not just echo the current token
        return mx.random.normal(w.shape) / (math.sqrt(w.shape[-1]) if tied else 1.0)
    if isinstance(module, nn.Conv1d):  # fan-in spans kernel and channels per group
        return mx.random.normal(w.shape) / math.sqrt(math.prod(w.shape[1:]))
    if w.ndim >= 2:  # Linear, SwitchLinear, MultiLinear, MoE gates
        return _GAIN * mx.random.normal(w.shape) / math.sqrt(w.shape[-1])
    if key == "A_log":  # decay exp(-exp(A_log) * dt) near 0.8 per token: the state remembers several tokens
        return mx.log(mx.random.uniform(0.05, 0.3, w.shape))
    return w + 2 * _NOISE * mx.random.normal(w.shape)  # sinks, dt_bias, router score biases


def _randomize(model: nn.Module) -> None:
    tied = "lm_head" not in model
    for path, module in model.named_modules():
        for key, value in list(module.items()):
            if isinstance(value, mx.array) and not key.startswith("_"):
                module[key] = _init_array(path, module, key, value, tied)


def _build_model(config: dict, seed: int) -> nn.Module:
    """The mlx-lm model as `load` leaves it (sanitize decides tying), with random weights."""
    mx.random.seed(seed)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)  # e.g. gemma3_text drops its lm_head when the weights lack one
    model.load_weights(list(weights.items()))
    _randomize(model)
    return model


def _quantize(model: nn.Module, config: dict, bits: int) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
        _, config = quantize_model(model, config, group_size=32, bits=bits)
    return config


def make_tiny_arch_dir(path: str | Path, case: str, *, seed: int = 0, bits: int | None = None,
                       overrides: dict | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files of one ARCHS case; returns the directory.
    `overrides` replaces config fields (benchmarks/bench_engine.py sizes a qwen3 like the default model)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {**arch_config(case), **(overrides or {})}
    model = _build_model(config, seed)
    if bits is not None:
        config = _quantize(model, config, bits)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    return out


# Multimodal-style wrappers whose config nests the text model's settings in `text_config` (as the
# released Ministral 3 / Mistral Small 4 (mistral3) and Gemma 4 (gemma4) checkpoints do); the
# text model's context length is past 4096, the wrapper's top level names none.
_TEXT = {k: _BASE[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                               "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size")}
WRAPPED: dict[str, dict] = {
    "mistral3": {"model_type": "mistral3", "text_config": {
        **_TEXT, "model_type": "ministral3", "max_position_embeddings": 262144, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "yarn", "type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384,
                            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                            "llama_4_scaling_beta": 0.1, "rope_theta": 1000000.0}}},
    "gemma4": {"model_type": "gemma4", "vocab_size": _BASE["vocab_size"], "text_config": {
        **_TEXT, "model_type": "gemma4_text", "max_position_embeddings": 131072, "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0, "global_head_dim": 32, "sliding_window": SLIDING_WINDOW,
        "layer_types": ["sliding_attention", "full_attention"]}},
}


def make_wrapped_arch_dir(path: str | Path, case: str, *, seed: int = 0) -> Path:
    """A WRAPPED checkpoint (config.json with `text_config`, weights, tokenizer); returns the directory."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(WRAPPED[case]))  # the model's args may write into text_config
    model = _build_model(json.loads(json.dumps(config)), seed)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2))
    return out
