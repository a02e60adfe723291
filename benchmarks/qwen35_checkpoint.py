"""A random-weight Qwen3.5-shaped hybrid checkpoint of the default model's size class (~135M), 4-bit.

Qwen3.5's layout (Gated DeltaNet linear-attention layers with a conv window and a delta-rule state
per request, one gated full-attention layer in four) at SmolLM2-135M's width: 576 hidden, 24 layers
(18 linear, 6 full: 9 heads / 3 kv heads of 64), linear attention 4 key / 8 value heads of 64,
conv kernel 4, 1536 MLP, 49152 vocab, tied; 4-bit affine (group 32), the tests' byte-level
tokenizer (tests/tiny_archs.py writes it; the weights are random, so only throughput means
anything). Written once under benchmarks/.cache; prints the directory.

    .venv/bin/python benchmarks/qwen35_checkpoint.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = {"hidden_size": 576, "num_hidden_layers": 24, "full_attention_interval": 4, "num_attention_heads": 9,
         "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
         "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 64,
         "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "max_position_embeddings": 8192}
OUT = ROOT / "benchmarks" / ".cache" / "qwen35-135m-random-4bit"


def checkpoint() -> Path:
    if not (OUT / "model.safetensors").exists():
        import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
        from tiny_archs import make_tiny_arch_dir

        make_tiny_arch_dir(OUT, "qwen3_5", bits=4, overrides=SHAPE)
    return OUT


if __name__ == "__main__":
    print(checkpoint())
