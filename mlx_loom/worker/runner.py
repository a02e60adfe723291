"""Model runner: one batched forward per step over the paged KV pool.

All scheduled tokens of a step (decode rows and prefill chunks) are flattened into one
sequence of T tokens, so every projection and MLP runs as a single GEMM over T rows. Only
attention is per group: the decode rows attend together ([B, H, 1, D] over their pages),
each prefill chunk attends on its own ([1, H, LQ, D], causal over its prefix pages).
The runner executes what the scheduler decided; it never allocates or frees blocks.

The flattened path above reuses the submodules of mlx-lm's llama model (embed_tokens,
layers[i].self_attn.{q,k,v,o}_proj and .rope, the norms, mlp; qwen3's q_norm / k_norm) and is taken only when the
structural check (mlx_loom/models/layout.py) says the model is exactly that; every other
model runs its own code over the same pools (mlx_loom/worker/generic_forward.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels import decode_layer as fused
from mlx_loom.kernels.activations import silu_mul
from mlx_loom.kernels.paged_attention import paged_attention_rows, write_kv
from mlx_loom.kernels.qmm import embedding_logits, linear, native_on_cpu
from mlx_loom.kernels.rope_norm import PLAIN_NORMS, rms_norm, rope
from mlx_loom.kernels.sparse_patterns import SparsePatternConfig, should_use_sparse
from mlx_loom.kernels.sparse_prefill import sparse_prefill_attention
from mlx_loom.models.layout import flattened_llama_reason, model_layout
from mlx_loom.sched.scheduler import ScheduledRow
from mlx_loom.worker.generic_forward import GenericForward
from mlx_loom.worker.kv_pools import KVPools
from mlx_loom.worker.state_pools import StatePools


@dataclass(frozen=True)
class AttentionGroup:
    """Rows that attend together: token span [start, end) of the flat batch."""

    start: int
    end: int
    q_len: int  # LQ: queries per row (1 for the decode group)
    start_pos: int  # position of the first query (prefill groups: the chunk's start)
    block_tables: mx.array  # [B, MB] int32
    q_pos: mx.array  # [B, LQ] int32


@dataclass(frozen=True)
class StepBatch:
    tokens: mx.array  # [T] int32
    positions: mx.array  # [T] int32
    slots: mx.array  # [T] int32, flat pool slot of each token
    groups: tuple[AttentionGroup, ...]
    sample_index: mx.array  # [S] flat index of the last num_draft + 1 tokens of each sampling row
    sample_rows: tuple[int, ...]  # index into the step's rows, in sample_index order


def build_step_batch(rows: Sequence[ScheduledRow], block_size: int) -> StepBatch:
    """Order decode rows first (one group), then each prefill chunk (a group each)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].token_ids) > 1)
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    last_index: dict[int, list[int]] = {}
    for i in order:
        row = rows[i]
        for p, tok in enumerate(row.token_ids, start=row.start_pos):
            tokens.append(tok)
            positions.append(p)
            slots.append(row.block_ids[p // block_size] * block_size + p % block_size)
        last_index[i] = list(range(len(tokens) - 1 - row.num_draft, len(tokens)))
    sample_rows = tuple(i for i in range(len(rows)) if rows[i].sample)
    return StepBatch(
        tokens=mx.array(tokens, dtype=mx.int32),
        positions=mx.array(positions, dtype=mx.int32),
        slots=mx.array(slots, dtype=mx.int32),
        groups=_attention_groups([rows[i] for i in order], block_size),
        sample_index=mx.array([j for i in sample_rows for j in last_index[i]], dtype=mx.int32),
        sample_rows=sample_rows,
    )


def _attention_groups(ordered: Sequence[ScheduledRow], block_size: int) -> tuple[AttentionGroup, ...]:
    decode = [r for r in ordered if len(r.token_ids) == 1]
    groups = []
    if decode:
        groups.append(_group(decode, 0, block_size))
    start = len(decode)
    for row in ordered[len(decode) :]:
        groups.append(_group([row], start, block_size))
        start += len(row.token_ids)
    return tuple(groups)


def _group(rows: Sequence[ScheduledRow], start: int, block_size: int) -> AttentionGroup:
    q_len = len(rows[0].token_ids)
    # Only the pages that hold keys up to each row's last query are gathered.
    pages = [r.block_ids[: (r.start_pos + q_len - 1) // block_size + 1] for r in rows]
    width = max(len(p) for p in pages)
    tables = [list(p) + [p[0]] * (width - len(p)) for p in pages]
    q_pos = [list(range(r.start_pos, r.start_pos + q_len)) for r in rows]
    return AttentionGroup(
        start=start,
        end=start + q_len * len(rows),
        q_len=q_len,
        start_pos=rows[0].start_pos,
        block_tables=mx.array(tables, dtype=mx.int32),
        q_pos=mx.array(q_pos, dtype=mx.int32),
    )


@dataclass(frozen=True)
class DecodeBatch:
    """A step of decode and verification rows (every token new): one entry per token, so row r's
    tokens are consecutive entries, each attending to its row's keys up to its own position."""

    tokens: mx.array  # [T] int32
    positions: mx.array  # [T] int32
    slots: mx.array  # [T] int32
    block_tables: mx.array  # [T, MB] int32, each entry's pages up to its position, padded
    sample_index: tuple[int, ...]  # each sampling row's last num_draft + 1 entries, in row order


def build_decode_batch(rows: Sequence[ScheduledRow], block_size: int) -> DecodeBatch:
    entries = [(r, i) for r in rows for i in range(len(r.token_ids))]
    positions = [r.start_pos + i for r, i in entries]
    pages = [r.block_ids[: p // block_size + 1] for (r, _), p in zip(entries, positions)]
    width = max(len(p) for p in pages)
    return DecodeBatch(
        tokens=mx.array([r.token_ids[i] for r, i in entries], dtype=mx.int32),
        positions=mx.array(positions, dtype=mx.int32),
        slots=mx.array([p[-1] * block_size + pos % block_size for p, pos in zip(pages, positions)], dtype=mx.int32),
        block_tables=mx.array([list(p) + [p[0]] * (width - len(p)) for p in pages], dtype=mx.int32),
        sample_index=tuple(j for j, (r, i) in enumerate(entries) if r.sample and i >= len(r.token_ids) - 1 - r.num_draft),
    )


def _fused_layers(model: nn.Module, ropes: list[tuple[mx.array, bool]] | None) -> list | None:
    """(weights, spec, inv_freq) per layer when every layer fits the fused decode primitive."""
    if ropes is None:
        return None
    out = []
    for layer, (inv_freq, _) in zip(model.model.layers, ropes):
        weights = fused.fused_layer_weights(layer)
        if weights is None:
            return None
        out.append((weights, fused.layer_spec(layer), inv_freq))
    return out


def _norm(module: nn.Module, x: mx.array) -> mx.array:
    """module(x); an nn.RMSNorm through rope_norm.rms_norm (native on the CPU, where MLX's is ~6 ops)."""
    return rms_norm(x, module.weight, module.eps) if type(module) in PLAIN_NORMS else module(x)


def _native_ropes(model: nn.Module) -> list[tuple[mx.array, bool]] | None:
    """(inv_freq, traditional) per layer when every layer's RoPE is one the native primitive runs."""
    if not native_on_cpu():
        return None
    out = []
    for layer in model.model.layers:
        rope = fused.rope_inv_freq(layer.self_attn.rope, fused.layer_head_dim(layer))
        if rope is None:
            return None
        out.append(rope)
    mx.eval([inv_freq for inv_freq, _ in out])
    return out


class ModelRunner:
    """Owns the per-layer KV pools and runs the paged forward (engine thread only)."""

    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: mx.Dtype,
                 sparse: SparsePatternConfig | None = None, force_generic: bool = False,
                 dense_decode_bytes: int | None = None, num_state_slots: int = 0,
                 num_state_snapshots: int = 0, fused_row_tokens: int = 1) -> None:
        self.model = model
        self.fused_row_tokens = fused_row_tokens
        """Rows of up to this many new tokens also run on the fused decode layer (one entry per token). The
        target keeps 1: its prefill chunks run op by op, on BLAS GEMMs; a draft model takes its short
        catch-up rows (the tokens it has not seen since its last proposal) there too."""
        self.sparse = sparse
        """Per-head sparse prefill patterns (MInference); long prefill chunks use them when the cost
        model says so (mlx_loom.kernels.sparse_patterns.should_use_sparse), everything else stays dense."""
        self.sparse_chunks = 0
        self.sparse_tokens = 0
        self.block_size = block_size
        full = model_layout(model)
        layout = list(full.kv)
        self.pools = KVPools(layout, num_blocks, block_size, dtype)
        self.states = StatePools(full.states, num_state_slots, num_state_snapshots) if full.states else None
        """Recurrent-state slots of a hybrid model (None: the model keeps only KV)."""
        if full.states and num_state_slots < 1:
            raise ValueError("this hybrid model keeps recurrent state: give the runner state slots")
        forced = force_generic or os.environ.get("MLX_LOOM_GENERIC_FORWARD", "0") == "1"  # for comparisons
        self.generic_reason = "forced" if forced else flattened_llama_reason(model)
        """None: the flattened llama path (and the fused decode layer) applies; else why the model runs
        its own code (GenericForward)."""
        if dense_decode_bytes is None:  # twice the pool: its rows are padded to the longest
            dense_decode_bytes = 2 * KVPools.bytes_per_block(layout, block_size, dtype) * num_blocks
        self.generic = (GenericForward(model, self.pools, dense_decode_bytes, self.states, full.entries)
                        if self.generic_reason else None)
        if self.generic is not None and sparse is not None:
            raise ValueError(f"sparse prefill patterns run on llama-shaped models only ({self.generic_reason})")
        if self.generic is None:
            self.num_kv_heads, self.head_dim = layout[0].kv_heads, layout[0].k_dim
        self.ropes = _native_ropes(model) if self.generic is None else None
        """Per layer (inv_freq [D/2], traditional) for the native RoPE primitive, or None: the model's
        own rope module runs (other backends, or a RoPE variant rope_inv_freq does not cover)."""
        self.fused_layers = (_fused_layers(model, self.ropes) if self.generic is None
                             and fused.native_decode_enabled() else None)

    @property
    def path(self) -> str:
        """Which forward runs: 'llama-flattened' (+ 'fused decode') or 'generic'."""
        if self.generic is not None:
            return "generic (model's own code" + (", one row per call)" if self.generic.rows_per_call == 1 else ")")
        return "llama-flattened" + (" + fused native decode" if self.fused_layers else "")

    def discard_derived(self) -> None:
        """Forget state derived from the pools (the generic path's decode mirror): after a failed step,
        the self-check and the warm-up."""
        if self.generic is not None:
            self.generic.discard_derived()

    def forget_scratch_states(self) -> None:
        """After rows that are not requests (self-check, warm-up): no state slot holds a request's tokens."""
        if self.states is not None:
            self.states.forget_positions()

    def pool_arrays(self) -> list[mx.array]:
        """Every array a step writes (KV pools, state pools): evaluate these to finish a step."""
        return self.generic.pool_arrays() if self.generic is not None else self.pools.arrays()

    @property
    def k_pools(self) -> list[mx.array]:
        return self.pools.k

    @property
    def v_pools(self) -> list[mx.array]:
        return self.pools.v

    @staticmethod
    def kv_bytes_per_block(model: nn.Module, block_size: int, dtype: mx.Dtype) -> int:
        return KVPools.bytes_per_block(model_layout(model).kv, block_size, dtype)

    @staticmethod
    def state_bytes_per_slot(model: nn.Module) -> int:
        """Bytes of one request's recurrent state (0: the model keeps only KV)."""
        return StatePools.bytes_per_slot(model_layout(model).states)

    def execute(self, rows: Sequence[ScheduledRow], tokens: mx.array | None = None) -> tuple[mx.array, tuple[int, ...]]:
        """Run one step; returns (logits [S, V] float32, the sampling rows' indices in order).

        Each sampling row contributes num_draft + 1 logits rows (1 unless speculative). tokens
        [T] int32, for decode rows only: their input tokens still on the device (the previous
        step's samples, not read yet), used instead of row.token_ids."""
        decode_only = all(len(r.token_ids) == 1 and not r.num_draft for r in rows)
        assert tokens is None or decode_only, "device tokens: decode rows only"
        if self.generic is not None:
            return self.generic(rows, tokens)
        # A verification row's tokens are all new (last token + drafts): each runs as a decode entry
        # at its own position, the same per-token computation a plain decode of that token does.
        if self.fused_layers is not None and all(len(r.token_ids) == 1 + r.num_draft
                                                 or len(r.token_ids) <= self.fused_row_tokens for r in rows):
            return self._execute_decode(rows, tokens)
        batch = build_step_batch(rows, self.block_size)
        if tokens is not None:  # decode rows keep their order in the batch
            batch = replace(batch, tokens=tokens)
        inner = self.model.model
        h = inner.embed_tokens(batch.tokens[None])  # [1, T, DM]
        for i, layer in enumerate(inner.layers):
            h = h + self._attention(i, layer.self_attn, _norm(layer.input_layernorm, h), batch)
            h = h + self._mlp(layer.mlp, _norm(layer.post_attention_layernorm, h))
        h = _norm(inner.norm, h)[0, batch.sample_index]  # [S, DM]
        return self._logits(h), batch.sample_rows  # [S, V]

    def _execute_decode(self, rows: Sequence[ScheduledRow], tokens: mx.array | None) -> tuple[mx.array, tuple[int, ...]]:
        """Decode and verification rows: one fused native primitive per layer (mlx_loom/kernels/decode_layer.py)."""
        d = build_decode_batch(rows, self.block_size)
        inner = self.model.model
        h = inner.embed_tokens(d.tokens if tokens is None else tokens)  # [T, DM]
        for i, (weights, spec, inv_freq) in enumerate(self.fused_layers):
            h, self.k_pools[i], self.v_pools[i] = fused.decode_layer(
                h, weights, self.k_pools[i], self.v_pools[i], d.slots, d.positions, d.block_tables, inv_freq, spec)
        if len(d.sample_index) < h.shape[0]:
            h = h[mx.array(d.sample_index, dtype=mx.int32)]
        return self._logits(inner.norm(h)), tuple(i for i, r in enumerate(rows) if r.sample)  # [S, V]

    def _logits(self, h: mx.array) -> mx.array:
        if getattr(self.model.args, "tie_word_embeddings", False):
            logits = embedding_logits(self.model.model.embed_tokens, h)
        else:
            logits = linear(self.model.lm_head, h)
        return logits.astype(mx.float32)

    @staticmethod
    def _mlp(mlp: nn.Module, x: mx.array) -> mx.array:
        """Gated MLP with the backend's fastest silu; other MLP shapes run as the model defines them."""
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return mlp(x)
        return linear(mlp.down_proj, silu_mul(linear(mlp.gate_proj, x), linear(mlp.up_proj, x)))

    def _attention(self, i: int, attn: nn.Module, x: mx.array, batch: StepBatch) -> mx.array:
        T = x.shape[1]
        H, HKV, D = attn.n_heads, attn.n_kv_heads, self.head_dim
        q = linear(attn.q_proj, x).reshape(T, H, D)
        k = linear(attn.k_proj, x).reshape(T, HKV, D)
        if hasattr(attn, "q_norm"):  # qwen3: per-head RMSNorm of q and k before RoPE
            q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
        if self.ropes is not None:
            q = rope(q, batch.positions, *self.ropes[i])
            k = rope(k, batch.positions, *self.ropes[i])
        else:  # one "row" per token so the model's RoPE takes each token's own position: [T, H, 1, D]
            q = attn.rope(q[:, :, None], offset=batch.positions).reshape(T, H, D)
            k = attn.rope(k[:, :, None], offset=batch.positions).reshape(T, HKV, D)
        v = linear(attn.v_proj, x).reshape(T, HKV, D)
        self.k_pools[i] = write_kv(self.k_pools[i], batch.slots, k)
        self.v_pools[i] = write_kv(self.v_pools[i], batch.slots, v)
        outs = [self._group_attention(g, q, attn.scale, i) for g in batch.groups]
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)  # [T, H*D]
        return linear(attn.o_proj, o[None])

    def _group_attention(self, g: AttentionGroup, q: mx.array, scale: float, i: int) -> mx.array:
        H, D = q.shape[1], q.shape[2]
        B = (g.end - g.start) // g.q_len
        qg = q[g.start : g.end].reshape(B, g.q_len, H, D)  # [B, LQ, H, D]: token-major, as q is
        if self._use_sparse(g, i):
            o = self._sparse_attention(qg.transpose(0, 2, 1, 3), g, scale, i).transpose(0, 2, 1, 3)
        else:
            o = paged_attention_rows(qg, self.k_pools[i], self.v_pools[i], g.block_tables, g.q_pos, scale)
        return o.reshape(B * g.q_len, H * D)  # [B*LQ, H*D]

    def _use_sparse(self, g: AttentionGroup, i: int) -> bool:
        """A prefill chunk (one row) long enough, and sparse enough, for its layer patterns."""
        if self.sparse is None or g.q_len == 1:
            return False
        use = should_use_sparse(g.start_pos + g.q_len, self.sparse, q_len=g.q_len)
        if use and i == 0:
            self.sparse_chunks += 1
            self.sparse_tokens += g.q_len
        return use

    def _sparse_attention(self, q: mx.array, g: AttentionGroup, scale: float, i: int) -> mx.array:
        """q [1, H, LQ, D] over the chunk's pages gathered dense: [HKV, 1, MB, BS, D] -> [1, HKV, L, D]."""
        HKV, D = self.num_kv_heads, self.head_dim
        k = self.k_pools[i][:, g.block_tables].reshape(1, HKV, -1, D)
        v = self.v_pools[i][:, g.block_tables].reshape(1, HKV, -1, D)
        return sparse_prefill_attention(q, k, v, g.start_pos, scale, self.sparse.layer(i))
