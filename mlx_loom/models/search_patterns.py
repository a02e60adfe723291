"""`mlx-loom search-patterns`: load a model and search its sparse-prefill head patterns offline
(the search itself is mlx_loom/kernels/pattern_search.py; this command only adds the loading)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_loom.kernels.calibration import calibration_tokens
from mlx_loom.kernels.pattern_search import search_model, summary
from mlx_loom.kernels.search_settings import from_namespace
from mlx_loom.kernels.sparse_patterns import save_config
from mlx_loom.models.loader import load_model


def run(ns: argparse.Namespace) -> int:
    loaded = load_model(ns.model)
    if ns.length > loaded.max_model_len:
        raise SystemExit(f"--length {ns.length} exceeds the model's context ({loaded.max_model_len})")
    settings = from_namespace(ns)
    result = search_model(loaded.model, calibration_tokens(loaded.tokenizer, ns.length), settings)
    path = save_config(result.config, Path(ns.output))
    print(f"{path}: {summary(result.config)} ({result.seconds:.0f} s)")
    return 0
