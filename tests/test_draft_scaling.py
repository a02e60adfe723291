"""Activation-aware scaling of self-drafts (mlx_loom/spec/draft_scaling.py) on tiny random-weight llamas."""

import logging

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask

from mlx_loom.spec import draft_model, draft_scaling
from mlx_loom.spec.draft_model import build_draft_model
from mlx_loom.spec.draft_scaling import (ALPHAS, LayerScales, activation_scales, channel_scales, input_means,
                                     scales_from_means)
from test_draft_model import tiny_target, tokens


def float_target(**extra) -> nn.Module:
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=320,
                           rope_theta=10000.0, tie_word_embeddings=True, **extra)
    mx.random.seed(0)
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def random_scales(model: nn.Module) -> list[LayerScales]:
    """Scales far from 1 in [1/4, 4], different per site and layer."""
    def s(n: int, seed: int) -> mx.array:
        return mx.power(2.0, mx.random.uniform(-2, 2, (n,), key=mx.random.key(seed)))

    d, f = model.args.hidden_size, model.args.intermediate_size
    return [LayerScales(attn=s(d, 3 * i), mlp=s(d, 3 * i + 1), down=s(f, 3 * i + 2)) for i in range(len(model.layers))]


def test_folds_are_exact_in_float(monkeypatch):
    """With the cast replaced by a float copy, the scaled draft computes the target's logits: every
    1/s lands where its s was applied (norms, up_proj rows and bias)."""
    def float_linear(w, bias, kind):
        out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        out.weight = w
        if bias is not None:
            out.bias = bias
        return out

    monkeypatch.setattr(draft_model, "_quantized_linear", float_linear)
    target = float_target(attention_bias=True, mlp_bias=True)
    target.model.layers[0].mlp.up_proj.bias = mx.random.normal((128,), key=mx.random.key(7))
    draft = build_draft_model(target, "mxfp4", random_scales(target))
    x = tokens()
    assert mx.allclose(draft(x), target(x), rtol=1e-4, atol=1e-4).item()
    d_layer, t_layer = draft.model.layers[0], target.model.layers[0]
    assert d_layer.input_layernorm is not t_layer.input_layernorm  # the draft's own copies
    assert d_layer.post_attention_layernorm is not t_layer.post_attention_layernorm
    assert draft.model.norm is target.model.norm and draft.model.embed_tokens is target.model.embed_tokens
    assert not mx.array_equal(d_layer.input_layernorm.weight, t_layer.input_layernorm.weight).item()


def test_scales_must_match_the_layer_count():
    target = tiny_target()
    with pytest.raises(ValueError, match="1 layer scales for a target with 2 layers"):
        build_draft_model(target, "mxfp4", random_scales(target)[:1])


def _layer0_inputs(model: nn.Module, chunk: list[int]) -> dict[str, mx.array]:
    """[L, C] inputs of q_proj, gate_proj and down_proj in layer 0, by the block's own modules."""
    layer = model.model.layers[0]
    h = model.model.embed_tokens(mx.array([chunk]))  # [1, L, D]
    attn_in = layer.input_layernorm(h)
    h = h + layer.self_attn(attn_in, create_attention_mask(h, None))
    mlp_in = layer.post_attention_layernorm(h)
    down_in = nn.silu(layer.mlp.gate_proj(mlp_in)) * layer.mlp.up_proj(mlp_in)
    return {"attn": attn_in[0], "mlp": mlp_in[0], "down": down_in[0]}


def test_input_means_are_mean_abs_inputs_and_modules_come_back():
    target = tiny_target()
    chunks = [[int(t) for t in tokens(1, 24)[0]], [int(t) for t in tokens(1, 40)[0][::-1]]]
    before = {name: id(m) for name, m in target.named_modules()}
    means = input_means(target, chunks)
    assert {name: id(m) for name, m in target.named_modules()} == before
    assert len(means) == 2 and all(set(m) == {"attn", "mlp", "down"} for m in means)
    per_chunk = [_layer0_inputs(target, c) for c in chunks]
    for site, got in means[0].items():
        expect = mx.abs(mx.concatenate([p[site] for p in per_chunk])).mean(0)
        assert got.shape == expect.shape
        assert mx.allclose(got, expect, rtol=1e-3, atol=1e-5).item(), site


def test_input_means_restores_modules_when_a_forward_fails(monkeypatch):
    target = tiny_target()
    before = {name: id(m) for name, m in target.named_modules()}

    def boom(module, x):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(draft_scaling, "linear", boom)
    with pytest.raises(RuntimeError, match="forward failed"):
        input_means(target, [[1, 2, 3]])
    assert {name: id(m) for name, m in target.named_modules()} == before
    with pytest.raises(ValueError, match="at least one chunk"):
        input_means(target, [])


def test_channel_scales():
    m = mx.array([0.0, 1e-9, 0.5, 1.0, 2.0, 8.0])
    s = channel_scales(m, 0.25)
    assert abs((mx.max(s) * mx.min(s)).item() - 1.0) < 1e-5
    assert all(a <= b for a, b in zip(s.tolist(), s.tolist()[1:]))  # larger activations, larger scales
    floor = 1e-3 * 11.5 / 6  # dead channels count as 1e-3 of the mean activation
    assert (mx.max(s) / mx.min(s)).item() == pytest.approx((8 / floor) ** 0.25, rel=1e-4)
    assert mx.allclose(channel_scales(m, 0.0), mx.ones(6)).item()


def test_scaling_helps_where_large_activations_meet_small_weights():
    """The case AWQ targets, as in trained models: a norm's large gain on a few channels, and small
    weight columns for those channels in the projections that read it. A plain cast rounds those
    small columns coarsely (their group's shared scale is set by the other columns); scaling them
    up before the cast keeps them, and the draft gets closer to the target."""
    target = float_target()
    boost = mx.where(mx.arange(64) % 16 == 0, 10.0, 1.0)  # 4 salient channels per norm
    for layer in target.model.layers:
        layer.input_layernorm.weight = layer.input_layernorm.weight * boost
        layer.post_attention_layernorm.weight = layer.post_attention_layernorm.weight * boost
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                     layer.mlp.up_proj):
            proj.weight = proj.weight / boost[None, :]  # the same function, its magnitude moved to the norm
    chunks = [[int(t) for t in tokens(1, 64)[0]]]
    scales = scales_from_means(input_means(target, chunks), 0.25)
    x = tokens(4, 32)
    ref = target(x)

    def rel_error(draft: nn.Module) -> float:
        return (mx.linalg.norm(draft(x) - ref) / mx.linalg.norm(ref)).item()

    plain, scaled = rel_error(build_draft_model(target, "mxfp4")), rel_error(build_draft_model(target, "mxfp4", scales))
    assert scaled < 0.85 * plain, (scaled, plain)


def test_unsupported_architecture_is_a_logged_plain_cast(caplog):
    target = tiny_target()
    target.model.layers[1].post_attention_layernorm = nn.LayerNorm(64)
    with caplog.at_level(logging.WARNING, logger="mlx_loom.spec.draft_scaling"):
        assert activation_scales(target, tokenizer=None, alpha=0.25) is None
    assert "layer 1 post_attention_layernorm is not an nn.RMSNorm" in caplog.text
    target = tiny_target()
    target.args.model_type = "gemma"
    assert activation_scales(target, tokenizer=None, alpha=0.25) is None
    assert "model_type 'gemma'" in caplog.text


def test_alpha_zero_is_a_plain_cast_without_calibration():
    assert activation_scales(tiny_target(), tokenizer=None, alpha=0.0) is None  # no text needed
    assert set(ALPHAS) == set(draft_model.DRAFT_KINDS)


def test_activation_scales_on_the_default_model(default_model):
    scales = activation_scales(default_model.model, default_model.tokenizer, alpha=0.25)
    assert len(scales) == len(default_model.model.layers)
    for layer in scales:
        for s in (layer.attn, layer.mlp, layer.down):
            assert mx.all(s > 0).item() and mx.all(mx.isfinite(s)).item()
            assert abs((mx.max(s) * mx.min(s)).item() - 1.0) < 1e-4
    assert scales[0].down.shape == (default_model.model.args.intermediate_size,)
