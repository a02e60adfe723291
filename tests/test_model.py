"""Model loading: the embedded SmolLM2 GGUF (float32 and 4-bit) and a tiny mlx-lm directory."""

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_loom.models import loader as model_mod  # noqa: E402
from mlx_loom.models.loader import describe_backend, load_model  # noqa: E402

QUESTION = "What is the capital of France?"


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def greedy(loaded, ids: list[int], max_tokens: int) -> list[int]:
    """Plain greedy decoding with mlx-lm's own KV cache (the reference for the paged runner)."""
    cache = make_prompt_cache(loaded.model)
    x = mx.array([ids])  # [1, L]
    out: list[int] = []
    for _ in range(max_tokens):
        logits = loaded.model(x, cache=cache)[0, -1]  # [V]
        token = int(mx.argmax(logits).item())
        out.append(token)
        if token in loaded.tokenizer.eos_token_ids:
            break
        x = mx.array([[token]])
    return out


def test_default_model_shape(default_model):
    m = default_model
    assert (m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim) == (30, 9, 3, 64)
    assert m.vocab_size == 49152 and m.max_model_len == 8192
    assert m.name == "SmolLM2-135M-Instruct.Q4_1"
    assert m.dtype == mx.float32  # dequantized on the CPU


def test_greedy_paris(default_model):
    tokens = greedy(default_model, chat_ids(default_model.tokenizer, QUESTION), 20)
    assert "Paris" in default_model.tokenizer.decode(tokens)


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, head_dim, cols = 3, 8, 5
    w = mx.arange(n_heads * head_dim * cols).reshape(n_heads * head_dim, cols)
    # llama.cpp convert_hf_to_gguf.py's permute (HF -> GGUF).
    permuted = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert mx.array_equal(model_mod._unpermute_rows(permuted, n_heads), w)


def test_dequantize_matches_mx_dequantize():
    w = mx.random.normal((64, 96), key=mx.random.key(0))
    for bits in (4, 8):
        q, s, b = mx.quantize(w, group_size=32, bits=bits)
        ref = mx.dequantize(q, s, b, group_size=32, bits=bits)
        assert mx.allclose(model_mod._dequantize(q, s, b, bits), ref, atol=1e-5)


@pytest.fixture(scope="module")
def quantized_model():
    return load_model(None, dequantize=False)


@pytest.fixture(scope="module")
def float_model():
    return load_model(None, dequantize=True)


def test_4bit_weights_match_float(float_model, quantized_model):
    attn = quantized_model.model.layers[3].self_attn.k_proj
    w = mx.dequantize(attn.weight, attn.scales, attn.biases, group_size=attn.group_size, bits=attn.bits)
    ref = float_model.model.layers[3].self_attn.k_proj.weight
    assert mx.allclose(w, ref, atol=1e-5)


def test_4bit_greedy_matches_float(float_model, quantized_model):
    # Same weights, different kernels: the first greedy tokens agree. A short raw prompt, since
    # MLX's CPU quantized matmul makes a chat-template prefill take seconds.
    ids = float_model.tokenizer.encode("The capital of France is")
    assert greedy(quantized_model, ids, 3) == greedy(float_model, ids, 3)


def test_describe_backend():
    text = describe_backend()
    assert "GFLOP/s" in text and str(mx.default_device()) in text


def test_tiny_mlx_dir(tmp_path, monkeypatch):
    from tiny_model import make_tiny_llama_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(str(make_tiny_llama_dir(tmp_path / "tiny")))
    assert (loaded.num_layers, loaded.num_heads, loaded.num_kv_heads, loaded.head_dim) == (2, 4, 2, 16)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi 😀"}])
    assert text == "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == "user\nHi 😀\nassistant\n"
    assert tok.eos_token_ids >= {2}
    logits = loaded.model(mx.array([ids]))  # [1, L, V]
    assert logits.shape == (1, len(ids), loaded.vocab_size)
