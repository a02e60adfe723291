"""The default model (the shipped SmolLM2-135M-Instruct Q4_1 GGUF) written as a 16-bit mlx-lm
directory: weights dequantized in float32 as llama.cpp does, then cast to float16 or bfloat16; the
GGUF's tokenizer (rebuilt by mlx_loom/models/tokenizer.py) saved as tokenizer.json with its chat
template. A 16-bit target of the exact default model, for the issue-32 benchmarks (the Q4_1 values
are exact in float16 to ~3 digits; the checkpoint is what a user converting the GGUF would get).
Written once under benchmarks/.cache; prints the directory.

    .venv/bin/python benchmarks/smollm2_checkpoint.py [float16|bfloat16]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = ("float16", "bfloat16")


def out_dir(dtype: str) -> Path:
    return ROOT / "benchmarks" / ".cache" / f"smollm2-135m-instruct-{dtype}"


def checkpoint(dtype: str = "float16") -> Path:
    """The directory (written on first use)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    out = out_dir(dtype)
    if (out / "model.safetensors").exists():
        return out
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_loom.models.loader import load_model

    loaded = load_model(dequantize=True)  # the default GGUF, float32
    cast = getattr(mx, dtype)
    weights = {k: v.astype(cast) for k, v in tree_flatten(loaded.model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    args = {k: v for k, v in dataclasses.asdict(loaded.model.args).items() if v is not None}
    (out / "config.json").write_text(json.dumps({**args, "torch_dtype": dtype}, indent=2))
    tok = loaded.tokenizer
    tok.backend.save(str(out / "tokenizer.json"))
    name = tok.id_to_token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
              "bos_token": name(tok.bos_token_id) if tok.bos_token_id is not None else None,
              "eos_token": name(tok.eos_token_id) if tok.eos_token_id is not None else None,
              "add_bos_token": tok.add_bos, "model_max_length": loaded.max_model_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


if __name__ == "__main__":
    print(checkpoint(sys.argv[1] if len(sys.argv) > 1 else "float16"))
