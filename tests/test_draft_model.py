"""Self-drafts (mlx_loom/spec/draft_model.py) on tiny random-weight llama models."""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_loom.spec import draft_model
from mlx_loom.spec.draft_model import DRAFT_KINDS, build_draft_model, load_draft_model
from tiny_model import make_tiny_llama_dir

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# kind -> (max relative logit error, min top-1 agreement) on the tiny random model
BOUNDS = {"mxfp4": (0.35, 0.7), "nvfp4": (0.35, 0.7), "mxfp8": (0.1, 0.9)}


def tiny_target(*, quantized: bool = True, tied: bool = True, bias: bool = False) -> nn.Module:
    """A 2-layer llama; quantized = affine 4-bit linears and an 8-bit embedding, like the default GGUF."""
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=320,
                           rope_theta=10000.0, tie_word_embeddings=tied, attention_bias=bias)
    mx.random.seed(0)
    model = llama.Model(args)
    if quantized:
        nn.quantize(model, class_predicate=lambda _p, m: {"group_size": 32, "bits": 8 if isinstance(m, nn.Embedding)
                                                           else 4} if hasattr(m, "to_quantized") else False)
    mx.eval(model.parameters())
    return model


def tokens(batch: int = 4, length: int = 32) -> mx.array:
    return mx.random.randint(0, 320, (batch, length), key=mx.random.key(1))  # [B, L]


def module_at(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def fake_quantized_twin(target: nn.Module, kind: str) -> nn.Module:
    """A float model whose projections hold dequantize(quantize(w, kind)): what the draft must compute."""
    group_size, bits = draft_model._MODE_PARAMS[kind]
    twin = llama.Model(target.args)
    weights = {}
    for i, layer in enumerate(target.model.layers):
        for name in PROJECTIONS:
            w = draft_model._float_weight(module_at(layer, name))
            wq, scales = mx.quantize(w, group_size=group_size, bits=bits, mode=kind)
            weights[f"model.layers.{i}.{name}.weight"] = mx.dequantize(wq, scales, None, group_size=group_size,
                                                                       bits=bits, mode=kind, dtype=mx.float32)
    for name in ("input_layernorm", "post_attention_layernorm"):
        for i, layer in enumerate(target.model.layers):
            weights[f"model.layers.{i}.{name}.weight"] = module_at(layer, name).weight
    weights["model.norm.weight"] = target.model.norm.weight
    twin.load_weights(list(weights.items()), strict=False)
    twin.model.embed_tokens = target.model.embed_tokens
    return twin


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_draft_logits_close_to_target(kind):
    target = tiny_target()
    draft = build_draft_model(target, kind)
    x = tokens()
    ref, out = target(x), draft(x)  # [B, L, V]
    assert out.dtype == mx.float32
    rel = (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()
    agree = (out.argmax(-1) == ref.argmax(-1)).astype(mx.float32).mean().item()
    max_rel, min_agree = BOUNDS[kind]
    assert rel < max_rel and agree >= min_agree, (kind, rel, agree)


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_draft_computes_the_cast_weights(kind):
    target = tiny_target()
    x = tokens(2, 16)
    out, expect = build_draft_model(target, kind)(x), fake_quantized_twin(target, kind)(x)
    assert mx.allclose(out, expect, rtol=1e-3, atol=1e-3).item()


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_projections_are_cast_and_the_rest_is_shared(kind):
    target = tiny_target()
    draft = build_draft_model(target, kind)
    assert type(draft) is type(target) and draft is not target and draft.model is not target.model
    assert draft.model.embed_tokens is target.model.embed_tokens
    assert draft.model.norm is target.model.norm
    group_size, bits = draft_model._MODE_PARAMS[kind]
    for d_layer, t_layer in zip(draft.model.layers, target.model.layers):
        assert d_layer is not t_layer
        assert d_layer.input_layernorm is t_layer.input_layernorm
        assert d_layer.post_attention_layernorm is t_layer.post_attention_layernorm
        for name in PROJECTIONS:
            q = module_at(d_layer, name)
            assert isinstance(q, nn.QuantizedLinear) and q is not module_at(t_layer, name)
            assert (q.mode, q.group_size, q.bits) == (kind, group_size, bits)


def test_target_is_not_modified():
    target = tiny_target()
    before = {k: (v, mx.array(v)) for k, v in tree_flatten(target.parameters())}
    modules = {k: id(m) for k, m in target.named_modules()}
    build_draft_model(target, "mxfp4")
    after = dict(tree_flatten(target.parameters()))
    assert after.keys() == before.keys()
    for k, (obj, copy) in before.items():
        assert after[k] is obj and mx.array_equal(after[k], copy).item(), k
    assert {k: id(m) for k, m in target.named_modules()} == modules
    assert target.model.layers[0].self_attn.q_proj.mode == "affine"


def test_float_target_untied_head_and_bias():
    target = tiny_target(quantized=False, tied=False, bias=True)
    draft = build_draft_model(target, "mxfp8")
    assert draft.lm_head is target.lm_head
    q_proj = draft.model.layers[0].self_attn.q_proj
    assert q_proj.bias is target.model.layers[0].self_attn.q_proj.bias
    x = tokens()
    agree = (draft(x).argmax(-1) == target(x).argmax(-1)).astype(mx.float32).mean().item()
    assert agree >= 0.9


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown draft kind 'int3'.*mxfp4"):
        build_draft_model(tiny_target(), "int3")


def test_kind_unsupported_on_device_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(draft_model, "_unsupported_reason", lambda kind, device: "no fp4 kernel here")
    with pytest.raises(ValueError, match="'nvfp4' cannot run on .*no fp4 kernel here"):
        build_draft_model(tiny_target(), "nvfp4")


@pytest.mark.parametrize("kind", DRAFT_KINDS)
def test_every_kind_runs_on_the_cpu(kind):
    if mx.default_device() != mx.cpu:
        pytest.skip("documents MLX's CPU backend")
    assert draft_model._unsupported_reason(kind, str(mx.default_device())) is None


def test_load_draft_model_checks_vocab(tmp_path):
    path = str(make_tiny_llama_dir(tmp_path / "draft", vocab_size=320))
    model = load_draft_model(path, 320)
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 320)
    with pytest.raises(ValueError, match="vocab size 320.*49152.*tokenizer"):
        load_draft_model(path, 49152)


@pytest.mark.parametrize("tied", [True, False])
def test_a_16_bit_head_gets_the_drafts_own_affine_copy(tied):
    """head_bits: the draft reads its own 8-bit copy of a 16-bit LM head (tied embedding or lm_head);
    the target, its args and its embedding stay as they were."""
    target = tiny_target(quantized=False, tied=tied)
    target.set_dtype(mx.float16)
    draft = build_draft_model(target, "mxfp4", head_bits=8)
    assert target.args.tie_word_embeddings is tied and draft.args.tie_word_embeddings is False
    assert draft.model.embed_tokens is target.model.embed_tokens
    assert isinstance(draft.lm_head, nn.QuantizedLinear) and (draft.lm_head.bits, draft.lm_head.group_size) == (8, 32)
    assert draft.lm_head is not getattr(target, "lm_head", None)
    source = target.model.embed_tokens.weight if tied else target.lm_head.weight
    head = mx.dequantize(draft.lm_head.weight, draft.lm_head.scales, draft.lm_head.biases, group_size=32, bits=8)
    assert mx.allclose(head, source.astype(mx.float32), atol=2e-2).item()
    x = tokens()
    shared = build_draft_model(target, "mxfp4")  # the same draft reading the target's own head
    agree = (draft(x).argmax(-1) == shared(x).argmax(-1)).astype(mx.float32).mean().item()
    assert agree >= 0.9


def test_an_already_quantized_head_is_shared():
    target = tiny_target()  # 8-bit embedding, tied
    draft = build_draft_model(target, "mxfp4", head_bits=8)
    assert draft.args.tie_word_embeddings is True and "lm_head" not in draft
    assert draft.model.embed_tokens is target.model.embed_tokens
