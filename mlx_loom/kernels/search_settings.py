"""Settings of the sparse-pattern search and its `mlx-loom search-patterns` options.

Pure Python (no mlx), so mlx_loom/server/cli.py can build its parser without loading MLX; the search
itself is mlx_loom/kernels/pattern_search.py.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class SearchSettings:
    length: int = 8192
    """Calibration tokens (the context length the config is tuned for)."""
    chunk: int = 512
    """Prefill chunk, as the engine's max_num_batched_tokens."""
    budget: int = 1024
    """Keys per query every candidate attends to: the compute budget."""
    min_kv_len: int = 2048
    """Chunks over fewer keys run dense in the engine and are not scored."""
    max_error: float = 0.2
    """Heads whose best relative output error is above this stay dense."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SearchSettings()
    parser.add_argument("--model", default=None,
                        help="GGUF file or mlx-lm directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--length", type=int, default=d.length, help="calibration tokens (default %(default)s)")
    parser.add_argument("--output", required=True, help="where to write the JSON config")
    parser.add_argument("--chunk", type=int, default=d.chunk, help="prefill chunk (default %(default)s)")
    parser.add_argument("--budget", type=int, default=d.budget,
                        help="keys per query every candidate pattern attends to (default %(default)s)")
    parser.add_argument("--min-kv-len", type=int, default=d.min_kv_len,
                        help="score only chunks attending at least this many keys (default %(default)s)")
    parser.add_argument("--max-error", type=float, default=d.max_error,
                        help="heads above this relative output error stay dense (default %(default)s)")


def from_namespace(ns: argparse.Namespace) -> SearchSettings:
    return SearchSettings(ns.length, ns.chunk, ns.budget, ns.min_kv_len, ns.max_error)
