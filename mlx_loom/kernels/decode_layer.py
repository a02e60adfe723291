"""One llama decoder layer for decode rows (one new token per row) over the paged KV pool.

    x = rms_norm(h) ; q, k, v = projections(x) ; RoPE(q, k) at each row's position
    write k, v at each row's slot ; a = attention of q over the row's pages (keys 0..pos)
    h = h + o_proj(a) ; h = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))

`decode_layer_reference` composes MLX ops and is the tested contract. On the CPU, the native
extension's DecodeLayer primitive runs the whole layer as one task (a decode step of a small
model is otherwise dominated by dispatching ~30 tiny ops per layer). The runner uses it for steps
whose rows are all decode rows (a verification row's tokens are one decode row each), when
`fused_layer_weights` accepts the model's layers.

Dims: T rows (one token each), DM model width, H / HKV query / kv heads, D head dim,
NB pages in the pool, BS tokens per page, MB pages per row's block table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama, qwen3
from mlx_lm.models.rope_utils import Llama3RoPE

from mlx_loom.kernels import lowp, qmm
from mlx_loom.kernels.activations import unrouted_type
from mlx_loom.kernels.reference import paged_attention_reference, write_kv_reference
from mlx_loom.kernels.rope_norm import PLAIN_NORMS, PLAIN_ROPES, fast_rope_inv_freq

_PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
                ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))

_FUSED_MLPS = (llama.MLP, qwen3.MLP)  # exactly down(silu(gate(x)) * up(x)), as the primitive computes


@dataclass(frozen=True)
class DecodeLayerSpec:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    attn_scale: float
    rope_traditional: bool
    qk_eps: float = 0.0
    """eps of the per-head q/k RMSNorms (qwen3); used when weights carries q_norm, k_norm at the end."""


def native_decode_enabled() -> bool:
    """The fused primitive runs here: extension built, CPU default device, MLX_LOOM_NATIVE_DECODE != 0."""
    return qmm.native_on_cpu() and os.environ.get("MLX_LOOM_NATIVE_DECODE", "1") != "0"


def decode_layer(
    h: mx.array,
    weights: list[mx.array],
    k_pool: mx.array,
    v_pool: mx.array,
    slots: mx.array,
    positions: mx.array,
    block_tables: mx.array,
    inv_freq: mx.array,
    spec: DecodeLayerSpec,
) -> tuple[mx.array, mx.array, mx.array]:
    """Native primitive on the CPU when built; the reference otherwise. Same contract, except that the
    native path writes the new k, v into the given pools in place when it runs and returns the same
    pool arrays: callers rebind to what is returned and keep no lazy reader of older pool contents."""
    if qmm.native_on_cpu():
        h = qmm.native_module().decode_layer(
            h, weights, k_pool, v_pool, slots, positions, block_tables, inv_freq,
            spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.eps, spec.attn_scale, spec.rope_traditional,
            spec.qk_eps)
        return h, k_pool, v_pool
    return decode_layer_reference(h, weights, k_pool, v_pool, slots, positions, block_tables, inv_freq, spec)


def decode_layer_reference(
    h: mx.array,
    weights: list[mx.array],
    k_pool: mx.array,
    v_pool: mx.array,
    slots: mx.array,
    positions: mx.array,
    block_tables: mx.array,
    inv_freq: mx.array,
    spec: DecodeLayerSpec,
) -> tuple[mx.array, mx.array, mx.array]:
    """h [T, DM]; weights = [attn_norm, ffn_norm, (w, scales, biases) x q, k, v, o, gate, up, down]
    (affine; 16-bit w with placeholders; fp4 w, uint8 scales and a placeholder)
    (+ [q_norm, k_norm], per-head RMSNorms of q and k before RoPE); pools [HKV, NB, BS, D]; slots,
    positions [T]; block_tables [T, MB]; inv_freq [D/2]. Returns (h' [T, DM], k_pool', v_pool')."""
    T = h.shape[0]
    H, HKV, D = spec.n_heads, spec.n_kv_heads, spec.head_dim
    attn_norm, ffn_norm, *mats = weights
    q, k, v, o, gate, up, down = (mats[i : i + 3] for i in range(0, 21, 3))
    x = mx.fast.rms_norm(h, attn_norm, spec.eps)
    queries, keys = _matmul(x, q).reshape(T, H, 1, D), _matmul(x, k).reshape(T, HKV, 1, D)
    if len(mats) == 23:  # q_norm, k_norm
        queries, keys = mx.fast.rms_norm(queries, mats[21], spec.qk_eps), mx.fast.rms_norm(keys, mats[22], spec.qk_eps)
    queries = _rope(queries, positions, inv_freq, spec.rope_traditional)
    keys = _rope(keys, positions, inv_freq, spec.rope_traditional)
    k_pool = write_kv_reference(k_pool, slots, keys.reshape(T, HKV, D))
    v_pool = write_kv_reference(v_pool, slots, _matmul(x, v).reshape(T, HKV, D))
    a = paged_attention_reference(queries, k_pool, v_pool, block_tables, positions[:, None], spec.attn_scale)
    h = h + _matmul(a.reshape(T, H * D), o)  # a [T, H, 1, D]
    x = mx.fast.rms_norm(h, ffn_norm, spec.eps)
    h = h + _matmul(nn.silu(_matmul(x, gate)) * _matmul(x, up), down)
    return h, k_pool, v_pool


def _matmul(x: mx.array, wsb: list[mx.array]) -> mx.array:
    """x [T, K] @ one projection's (w, scales, biases): affine, 16-bit (w alone) or fp4 (uint8 scales)."""
    w, scales, biases = wsb
    K = x.shape[-1]
    if w.dtype in lowp.HALF_DTYPES:
        return lowp.half_matmul_reference(x, w)
    if scales.dtype == mx.uint8:
        return lowp.fp4_matmul_reference(x, w, scales, "mxfp4" if K // scales.shape[-1] == 32 else "nvfp4")
    return qmm.affine_qmm_reference(x, w, scales, biases, K // scales.shape[-1], w.shape[-1] * 32 // K)


def _rope(x: mx.array, positions: mx.array, inv_freq: mx.array, traditional: bool) -> mx.array:
    """x [T, heads, 1, D] rotated at positions [T] with inverse frequencies [D/2]."""
    return mx.fast.rope(x, x.shape[-1], traditional=traditional, base=None, scale=1.0, offset=positions,
                        freqs=1.0 / inv_freq)


# -- eligibility: which mlx-lm layers the fused path runs --

def rope_inv_freq(rope: nn.Module, head_dim: int) -> tuple[mx.array, bool] | None:
    """(inv_freq [D/2] float32 with the position scale folded in, traditional) for the RoPE modules
    whose call is a plain mx.fast.rope over the whole head; None for any other (e.g. scaled inputs)."""
    if type(rope) in PLAIN_ROPES and rope.dims == head_dim:
        return fast_rope_inv_freq(head_dim, rope.base, rope.scale), rope.traditional
    if type(rope) is Llama3RoPE and getattr(rope, "dims", None) == head_dim:
        return (1.0 / rope._freqs).astype(mx.float32), rope.traditional
    return None


_PLACEHOLDER = mx.zeros((1,), dtype=mx.float32)  # the scales / biases slots a 16-bit or fp4 projection lacks


def projection_arrays(m: nn.Module) -> list[mx.array] | None:
    """(w, scales, biases) of a bias-free projection the primitive runs: affine 4/8-bit with float32
    scales, a 16-bit Linear or an MXFP4 / NVFP4 QuantizedLinear routed to the lowp kernels (missing
    slots hold a placeholder); None for anything else."""
    if "bias" in m:
        return None
    if isinstance(m, lowp.NativeHalfLinear):
        return [m.weight, _PLACEHOLDER, _PLACEHOLDER]
    if isinstance(m, lowp.NativeFp4Linear):
        return [m.weight, m.scales, _PLACEHOLDER]
    if not (isinstance(m, nn.QuantizedLinear) and getattr(m, "mode", "affine") == "affine"):
        return None
    if m.bits not in (4, 8) or m.group_size not in (32, 64, 128) or m.scales.dtype != mx.float32:
        return None
    return [m.weight, m.scales, m.biases]


def fused_layer_weights(layer: nn.Module) -> list[mx.array] | None:
    """The 23 arrays decode_layer takes (25 with qwen3's q/k norms), or None when the layer is not a
    llama layer (or qwen3's: llama plus per-head q/k RMSNorms) with bias-free projections of one of
    `projection_arrays`' kinds and float32 RMSNorms."""
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    if not all(type(n) in PLAIN_NORMS and n.weight.dtype == mx.float32 for n in norms):
        return None
    if not isinstance(getattr(layer, "mlp", None), nn.Module) or unrouted_type(layer.mlp) not in _FUSED_MLPS:
        return None
    qk = _qk_norm_weights(getattr(layer, "self_attn", None))
    if qk is False:
        return None
    out = [norms[0].weight, norms[1].weight]
    for parent, name in _PROJECTIONS:
        m = getattr(getattr(layer, parent, None), name, None)
        arrays = projection_arrays(m) if isinstance(m, nn.Module) else None
        if arrays is None:
            return None
        out += arrays
    return out + (qk or [])


def _qk_norm_weights(attn: nn.Module | None) -> list[mx.array] | None | bool:
    """[q_norm, k_norm] weights for qwen3-style per-head RMSNorms of one eps; None when the layer has
    none; False when it has q/k norms the primitive cannot run."""
    norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
    if norms == [None, None]:
        return None
    ok = all(type(n) in PLAIN_NORMS and n.weight.dtype == mx.float32 and n.weight.ndim == 1 for n in norms)
    if not ok or norms[0].eps != norms[1].eps or norms[0].weight.shape != norms[1].weight.shape:
        return False
    return [norms[0].weight, norms[1].weight]


def layer_head_dim(layer: nn.Module) -> int:
    """head_dim of a llama / qwen3 attention (qwen3's module keeps it only in its projections)."""
    attn = layer.self_attn
    if getattr(attn, "head_dim", None):
        return int(attn.head_dim)
    o = attn.o_proj
    in_features = o.weight.shape[-1] * 32 // o.bits if isinstance(o, nn.QuantizedLinear) else o.weight.shape[-1]
    return in_features // attn.n_heads


def layer_spec(layer: nn.Module) -> DecodeLayerSpec:
    attn = layer.self_attn
    head_dim = layer_head_dim(layer)
    rope = rope_inv_freq(attn.rope, head_dim)
    q_norm = getattr(attn, "q_norm", None)
    return DecodeLayerSpec(
        n_heads=attn.n_heads,
        n_kv_heads=attn.n_kv_heads,
        head_dim=head_dim,
        eps=float(layer.input_layernorm.eps),
        attn_scale=float(attn.scale),
        rope_traditional=bool(rope[1]) if rope else False,
        qk_eps=float(q_norm.eps) if q_norm is not None else 0.0,
    )
