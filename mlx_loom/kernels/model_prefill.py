"""Whole-model chunked prefill over dense per-layer K/V with a pluggable attention.

Used by the pattern search (to capture each layer's q/k/v on calibration text), the model-level
fidelity checks and benchmarks/bench_sparse_prefill.py. It runs an mlx-lm llama-family model's
public submodules the way mlx_loom/worker/runner.py does for one prefill chunk (projections through
mlx_loom.kernels.qmm, RoPE at the chunk's offset, exp2 silu), but keeps K/V as dense [1, HKV, N, D]
arrays instead of the engine's paged pools: the attention callback sees exactly what the
engine's attention sees for a chunk (its queries and every key up to its last one).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels.activations import silu_mul
from mlx_loom.kernels.qmm import embedding_logits, linear
from mlx_loom.kernels.sparse_patterns import SparsePatternConfig, should_use_sparse
from mlx_loom.kernels.sparse_prefill import dense_prefill_attention, sparse_prefill_attention

# (layer, q [1, H, C, D], k [1, HKV, >=L, D], v, q_offset, scale) -> [1, H, C, D]
AttentionFn = Callable[[int, mx.array, mx.array, mx.array, int, float], mx.array]


def dense_attention(layer: int, q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float) -> mx.array:
    return dense_prefill_attention(q, k, v, q_offset, scale)


def sparse_attention(config: SparsePatternConfig, min_kv_len: int | None = None,
                     max_ratio: float | None = None) -> AttentionFn:
    """Per-head sparse attention for chunks that should_use_sparse accepts, dense otherwise
    (None: the thresholds measured for this CPU; decode rows are always dense)."""
    opts = {k: v for k, v in (("min_kv_len", min_kv_len), ("max_ratio", max_ratio)) if v is not None}

    def attend(layer: int, q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float) -> mx.array:
        L = q_offset + q.shape[2]
        if should_use_sparse(L, config, q_len=q.shape[2], **opts):
            return sparse_prefill_attention(q, k, v, q_offset, scale, config.layer(layer))
        return dense_prefill_attention(q, k, v, q_offset, scale)

    return attend


class DenseKVModel:
    """One sequence through a llama-family model, K/V kept dense per layer (preallocated)."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        self.model = model
        inner = model.model
        attn = inner.layers[0].self_attn
        shape = (1, attn.n_kv_heads, max_len, attn.head_dim)  # [1, HKV, N, D]
        dtype = inner.norm.weight.dtype
        self.k = [mx.zeros(shape, dtype=dtype) for _ in inner.layers]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in inner.layers]
        self.length = 0

    def forward(self, tokens: Sequence[int], attention: AttentionFn) -> mx.array:
        """Append tokens; returns their final-norm hidden states [C, DM] (not evaluated)."""
        inner = self.model.model
        start = self.length
        h = inner.embed_tokens(mx.array(tokens, dtype=mx.int32)[None])  # [1, C, DM]
        for i, layer in enumerate(inner.layers):
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), start, attention)
            mlp = layer.mlp
            x = layer.post_attention_layernorm(h)
            h = h + linear(mlp.down_proj, silu_mul(linear(mlp.gate_proj, x), linear(mlp.up_proj, x)))
        self.length = start + len(tokens)
        return inner.norm(h)[0]

    def _attention(self, i: int, attn: nn.Module, x: mx.array, start: int, attention: AttentionFn) -> mx.array:
        C = x.shape[1]
        H, HKV, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q = attn.rope(linear(attn.q_proj, x).reshape(1, C, H, D).transpose(0, 2, 1, 3), offset=start)
        k = attn.rope(linear(attn.k_proj, x).reshape(1, C, HKV, D).transpose(0, 2, 1, 3), offset=start)
        v = linear(attn.v_proj, x).reshape(1, C, HKV, D).transpose(0, 2, 1, 3)  # [1, HKV, C, D]
        self.k[i][:, :, start : start + C] = k
        self.v[i][:, :, start : start + C] = v
        o = attention(i, q, self.k[i], self.v[i], start, attn.scale)  # [1, H, C, D]
        return linear(attn.o_proj, o.transpose(0, 2, 1, 3).reshape(1, C, H * D))

    def logits(self, h: mx.array) -> mx.array:
        """h [C, DM] -> logits [C, V] float32."""
        inner = self.model.model
        if getattr(self.model.args, "tie_word_embeddings", False):
            return embedding_logits(inner.embed_tokens, h).astype(mx.float32)
        return linear(self.model.lm_head, h).astype(mx.float32)

    def state(self) -> list[mx.array]:
        return self.k + self.v


def prefill(model: nn.Module, tokens: Sequence[int], chunk: int, attention: AttentionFn,
            max_len: int | None = None) -> Iterator[tuple[int, mx.array, DenseKVModel]]:
    """Chunked prefill; yields (start, hidden [C, DM] evaluated, the runner) after every chunk."""
    runner = DenseKVModel(model, max_len or len(tokens))
    for start in range(0, len(tokens), chunk):
        h = runner.forward(tokens[start : start + chunk], attention)
        mx.eval(h, runner.state())
        yield start, h, runner


def greedy_continue(runner: DenseKVModel, last_hidden: mx.array, n: int) -> list[int]:
    """n greedy tokens after a prefill (decode is always dense)."""
    out: list[int] = []
    h = last_hidden[-1:]
    for _ in range(n):
        tok = int(mx.argmax(runner.logits(h), axis=-1).item())
        out.append(tok)
        h = runner.forward([tok], dense_attention)
    return out
