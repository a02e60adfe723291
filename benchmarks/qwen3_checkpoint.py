"""A random-weight Qwen3 checkpoint of the default model's size class, for the generic-path benchmark.

SmolLM2-135M's shape (576 hidden, 30 layers, 9 heads / 3 kv heads of 64, 1536 MLP, 49152 vocab,
tied) as mlx-lm's qwen3 (q/k norms), 4-bit affine (group 32, float32 scales: as the default GGUF is
4-bit), with the tests' byte-level tokenizer (tests/tiny_archs.py
writes it; the weights are random, so only throughput means anything). Written once under
benchmarks/.cache; prints the directory.

    .venv/bin/python benchmarks/qwen3_checkpoint.py
    .venv/bin/python benchmarks/bench_engine.py --model $(.venv/bin/python benchmarks/qwen3_checkpoint.py) \\
        --systems mlx-loom mlx-lm --out bench_engine_qwen3
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

SHAPE = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
         "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192}
OUT = ROOT / "benchmarks" / ".cache" / "qwen3-135m-random-4bit"


def checkpoint() -> Path:
    if not (OUT / "model.safetensors").exists():
        import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
        from tiny_archs import make_tiny_arch_dir

        make_tiny_arch_dir(OUT, "qwen3", bits=4, overrides=SHAPE)
    return OUT


if __name__ == "__main__":
    print(checkpoint())
