"""The fused native decode layer against its pure-MLX reference (mlx_loom/kernels/decode_layer.py)."""

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models import llama  # noqa: E402

from mlx_loom.kernels import qmm  # noqa: E402
from mlx_loom.kernels.decode_layer import (  # noqa: E402
    decode_layer,
    decode_layer_reference,
    fused_layer_weights,
    layer_head_dim,
    layer_spec,
    rope_inv_freq,
)

pytestmark = pytest.mark.skipif(not qmm.native_available(),
                                reason=f"native kernels not built: {qmm.native_unavailable_reason()}")

BS = 8  # tokens per page


def _layer(dm=128, heads=6, kv_heads=2, head_dim=32, ff=320, bits=4, group_size=32, traditional=False,
           rope_scaling=None, seed=0):
    args = llama.ModelArgs(model_type="llama", hidden_size=dm, num_hidden_layers=1, intermediate_size=ff,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                           rms_norm_eps=1e-5, vocab_size=64, rope_theta=10000.0, rope_traditional=traditional,
                           rope_scaling=rope_scaling)
    mx.random.seed(seed)
    model = llama.Model(args)
    nn.quantize(model, group_size=group_size, bits=bits)
    layer = model.model.layers[0]
    # Non-trivial norm weights, so a swapped norm would show.
    layer.input_layernorm.weight = mx.random.uniform(0.5, 1.5, (dm,))
    layer.post_attention_layernorm.weight = mx.random.uniform(0.5, 1.5, (dm,))
    return layer


def _batch(positions, num_pages, seed=1):
    """Each row gets its own shuffled pages covering keys 0..pos; returns slots, positions, tables."""
    key = mx.random.key(seed)
    perm = mx.random.permutation(num_pages, key=key).tolist()
    tables, slots = [], []
    for pos in positions:
        need = pos // BS + 1
        pages, perm = perm[:need], perm[need:]
        tables.append(pages)
        slots.append(pages[-1] * BS + pos % BS)
    width = max(map(len, tables))
    tables = [t + [t[0]] * (width - len(t)) for t in tables]  # padding pages: any valid id
    as_i32 = lambda v: mx.array(v, dtype=mx.int32)  # noqa: E731
    return as_i32(slots), as_i32(positions), as_i32(tables)


def _pools(layer, num_pages, seed=2):
    attn = layer.self_attn
    shape = (attn.n_kv_heads, num_pages, BS, layer_head_dim(layer))
    k = mx.random.normal(shape, key=mx.random.key(seed))
    v = mx.random.normal(shape, key=mx.random.key(seed + 1))
    mx.eval(k, v)
    return k, v


def _check(layer, positions, h=None, atol=2e-5):
    weights, spec = fused_layer_weights(layer), layer_spec(layer)
    inv_freq, _ = rope_inv_freq(layer.self_attn.rope, spec.head_dim)
    num_pages = sum(p // BS + 1 for p in positions) + 3
    slots, pos, tables = _batch(positions, num_pages)
    k_pool, v_pool = _pools(layer, num_pages)
    if h is None:
        h = mx.random.normal((len(positions), layer.input_layernorm.weight.shape[0]), key=mx.random.key(3))
    ref = decode_layer_reference(h, weights, k_pool, v_pool, slots, pos, tables, inv_freq, spec)
    mx.eval(ref)
    k_nat, v_nat = k_pool * 1, v_pool * 1  # own buffers: the native path writes its pools in place
    mx.eval(k_nat, v_nat)
    out = decode_layer(h, weights, k_nat, v_nat, slots, pos, tables, inv_freq, spec)
    mx.eval(out)
    for got, want, name in zip(out, ref, ("h", "k_pool", "v_pool")):
        err = mx.abs(got - want).max().item()
        assert err <= atol * max(1.0, mx.abs(want).max().item()), (name, err)
    assert out[1] is k_nat and out[2] is v_nat


@pytest.mark.parametrize("positions", [[0], [5], [7, 8, 9], [0, 15, 16, 33, 64, 2, 100, 1, 40]])
def test_matches_reference_across_page_boundaries(positions):
    _check(_layer(), positions)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64)])
def test_matches_reference_for_each_quantization(bits, group_size):
    _check(_layer(dm=256, heads=4, head_dim=64, ff=384, bits=bits, group_size=group_size), [3, 20, 41])


def _lowp_layer(kind: str):
    """A float layer whose projections are 16-bit (float16 / bfloat16) or cast to mxfp4 / nvfp4, routed
    to the lowp kernels as the loader and the draft builder route them."""
    from mlx_loom.kernels.lowp import route_lowp_modules

    args = llama.ModelArgs(model_type="llama", hidden_size=256, num_hidden_layers=1, intermediate_size=384,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                           vocab_size=64, rope_theta=10000.0)
    mx.random.seed(0)
    model = llama.Model(args)
    if kind in ("float16", "bfloat16"):
        for _, m in model.named_modules():
            if isinstance(m, nn.Linear):
                m.weight = m.weight.astype(getattr(mx, kind))
    else:
        nn.quantize(model, mode=kind, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    assert route_lowp_modules(model) > 0
    layer = model.model.layers[0]
    layer.input_layernorm.weight = mx.random.uniform(0.5, 1.5, (256,))
    layer.post_attention_layernorm.weight = mx.random.uniform(0.5, 1.5, (256,))
    return layer


@pytest.mark.parametrize("kind", ["float16", "bfloat16", "mxfp4", "nvfp4"])
def test_matches_reference_for_16_bit_and_fp4_projections(kind, isa):
    layer = _lowp_layer(kind)
    assert fused_layer_weights(layer) is not None
    _check(layer, [3, 20, 41])
    _check(layer, [0, 7, 8, 9, 64, 100])


@pytest.fixture(params=qmm.native_module().kernel_isas() if qmm.native_available() else ["none"])
def isa(request):
    native = qmm.native_module()
    previous = native.kernel_isa()
    native.set_kernel_isa(request.param)
    yield request.param
    native.set_kernel_isa(previous)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (9, 3, 64), (8, 1, 24), (2, 2, 128)])
def test_matches_reference_for_head_layouts(heads, kv_heads, head_dim):
    # head_dim 24: not a multiple of the 8-float SIMD lanes, so the tail loops run.
    _check(_layer(dm=128, heads=heads, kv_heads=kv_heads, head_dim=head_dim), [0, 9, 30])


def test_traditional_rope_and_llama3_scaling():
    _check(_layer(traditional=True), [4, 17])
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    layer = _layer(rope_scaling=llama3)
    assert type(layer.self_attn.rope).__name__ == "Llama3RoPE"
    _check(layer, [4, 17, 90])


def test_batch_of_32_rows():
    _check(_layer(), list(range(0, 32 * 5, 5)))


def test_strided_input_rows():
    h = mx.random.normal((128, 3), key=mx.random.key(7)).T  # [3, 128], column-major view
    _check(_layer(), [2, 11, 25], h=h)


def test_qwen3_layer_with_per_head_qk_norms_matches_reference_and_mlx_lm():
    """qwen3 = llama + per-head RMSNorms of q and k before RoPE: the 25-weight form, checked against the
    reference composition and against the model's own layer through mlx-lm's KV cache."""
    from mlx_lm.models import qwen3
    from mlx_lm.models.cache import KVCache

    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=128, num_hidden_layers=1, intermediate_size=320,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                           vocab_size=64, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1e4)
    mx.random.seed(3)
    model = qwen3.Model(args)
    nn.quantize(model, group_size=32, bits=4)
    layer = model.model.layers[0]
    layer.self_attn.q_norm.weight = mx.random.uniform(0.5, 2.0, (32,))
    layer.self_attn.k_norm.weight = mx.random.uniform(0.5, 2.0, (32,))
    weights, spec = fused_layer_weights(layer), layer_spec(layer)
    assert len(weights) == 25 and spec.head_dim == 32 and spec.qk_eps == 1e-5
    _check(layer, [0, 5, 17])
    # one sequence decoded token by token: the fused layer against the model's own layer + KVCache
    steps = 6
    xs = mx.random.normal((steps, 128))
    cache, (k_pool, v_pool) = KVCache(), _pools(layer, 2)
    k_pool, v_pool = k_pool * 0, v_pool * 0  # own dense buffers: the primitive writes them in place
    mx.eval(k_pool, v_pool)
    inv_freq, _ = rope_inv_freq(layer.self_attn.rope, 32)
    tables = mx.array([[0, 1]], dtype=mx.int32)
    for t in range(steps):
        want = layer(xs[t][None, None], mask=None, cache=cache)[0]  # [1, DM]
        got = decode_layer(xs[t][None], weights, k_pool, v_pool, mx.array([t], dtype=mx.int32),
                           mx.array([t], dtype=mx.int32), tables, inv_freq, spec)[0]
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-4)


def test_unsupported_layers_are_refused():
    layer = _layer()
    assert fused_layer_weights(layer) is not None
    dense = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=1,
                                        intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                        rms_norm_eps=1e-5, vocab_size=64))
    assert fused_layer_weights(dense.model.layers[0]) is None  # float weights: the MLX path runs them


def test_bad_arguments_name_the_problem():
    layer = _layer()
    weights, spec = fused_layer_weights(layer), layer_spec(layer)
    inv_freq, _ = rope_inv_freq(layer.self_attn.rope, spec.head_dim)
    slots, pos, tables = _batch([3], 4)
    k_pool, v_pool = _pools(layer, 4)
    h = mx.zeros((1, 128))
    with pytest.raises(ValueError, match="one entry per row"):
        decode_layer(mx.zeros((2, 128)), weights, k_pool, v_pool, slots, pos, tables, inv_freq, spec)
    with pytest.raises(ValueError, match="23 weights"):
        decode_layer(h, weights[:-1], k_pool, v_pool, slots, pos, tables, inv_freq, spec)
    with pytest.raises(ValueError, match="int32"):
        decode_layer(h, weights, k_pool, v_pool, slots.astype(mx.int64), pos, tables, inv_freq, spec)
    bad = list(weights)
    bad[7] = bad[7][:, :-1]  # k_proj's biases (2 norms, then w, scales, biases per projection) lose a column
    with pytest.raises(ValueError, match=r"k_proj \(w \(\d+,\d+\) uint32, scales") as exc:
        decode_layer(h, bad, k_pool, v_pool, slots, pos, tables, inv_freq, spec)
    assert "scales/biases of equal 2-d shape" in str(exc.value)
