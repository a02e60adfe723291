"""Offline search for per-head sparse-prefill patterns (MInference 1.0's offline step).

The model prefills calibration text densely in engine-sized chunks; at every layer, each chunk
long enough to run sparse in the engine is also attended with every candidate pattern (all at
the same compute budget: keys scored per query) and the per-head output error against dense is
accumulated. A head takes the candidate with the lowest relative error (near-ties, within
TIE_MARGIN, go to the cheapest), or stays dense when even that error exceeds max_error.

Calibration text: the Python language reference shipped with every CPython
(`pydoc_data.topics`, ~450K characters of prose with code), so the search needs no download.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import mlx.core as mx
import numpy as np

from mlx_loom.kernels.model_prefill import prefill
from mlx_loom.kernels.search_settings import SearchSettings
from mlx_loom.kernels.sparse_patterns import HeadPattern, SparsePatternConfig, head_cost
from mlx_loom.kernels.sparse_prefill import dense_prefill_attention, run_pattern

TIE_MARGIN = 0.01


def candidate_patterns(budget: int) -> tuple[HeadPattern, ...]:
    """Each pattern kind at `budget` keys per query, vertical-slash with three column/diagonal splits."""
    quarter = budget // 4
    return (
        HeadPattern("a_shape", 64, budget - 64),
        HeadPattern("block_sparse", budget, 0),
        HeadPattern("vertical_and_slash", quarter, budget - quarter),
        HeadPattern("vertical_and_slash", 2 * quarter, budget - 2 * quarter),
        HeadPattern("vertical_and_slash", 3 * quarter, budget - 3 * quarter),
    )


def head_errors(q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float,
                candidates: Sequence[HeadPattern], dense: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Squared output error per candidate and head, summed over queries: ([C, H], dense norm [H])."""
    if dense is None:
        dense = dense_prefill_attention(q, k, v, q_offset, scale)
    errs = [((run_pattern(c, q, k, v, q_offset, scale) - dense) ** 2).sum(axis=(0, 2, 3)) for c in candidates]
    return mx.stack(errs), (dense**2).sum(axis=(0, 2, 3))


def choose_patterns(err2: np.ndarray, norm2: np.ndarray, candidates: Sequence[HeadPattern],
                    max_error: float, kv_len: int, q_len: int = 512) -> list[HeadPattern]:
    """err2 [C, H], norm2 [H] -> one pattern per head, its score = 1 - relative error."""
    rel = np.sqrt(err2 / np.maximum(norm2, 1e-30))  # [C, H]
    cost = [head_cost(c, q_len, kv_len) for c in candidates]
    chosen = []
    for h in range(rel.shape[1]):
        best = rel[:, h].min()
        if best > max_error:
            chosen.append(HeadPattern("dense", 0, 0, round(1.0 - float(best), 4)))
            continue
        near = [c for c in range(len(candidates)) if rel[c, h] <= best + TIE_MARGIN]
        c = min(near, key=lambda i: (cost[i], rel[i, h]))
        p = candidates[c]
        chosen.append(HeadPattern(p.kind, p.budget_a, p.budget_b, round(1.0 - float(rel[c, h]), 4)))
    return chosen


@dataclass
class ErrorRecorder:
    """Attention callback for model_prefill: dense output, plus candidate errors per layer."""

    candidates: Sequence[HeadPattern]
    min_kv_len: int
    err2: dict[int, mx.array] = field(default_factory=dict)
    norm2: dict[int, mx.array] = field(default_factory=dict)

    def __call__(self, layer: int, q: mx.array, k: mx.array, v: mx.array, q_offset: int, scale: float) -> mx.array:
        dense = dense_prefill_attention(q, k, v, q_offset, scale)
        if q_offset + q.shape[2] >= self.min_kv_len:
            e, n = head_errors(q, k, v, q_offset, scale, self.candidates, dense)
            mx.eval(e, n)
            self.err2[layer] = self.err2.get(layer, 0) + e
            self.norm2[layer] = self.norm2.get(layer, 0) + n
        return dense


@dataclass(frozen=True)
class SearchResult:
    config: SparsePatternConfig
    rel_errors: np.ndarray  # [layers, C, H] relative output error of every candidate
    candidates: tuple[HeadPattern, ...]
    seconds: float


def search_model(model, tokens: Sequence[int], settings: SearchSettings) -> SearchResult:
    """Run the search on one calibration sequence (len(tokens) = the tuned length)."""
    cands = candidate_patterns(settings.budget)
    rec = ErrorRecorder(cands, settings.min_kv_len)
    t0 = time.perf_counter()
    for _ in prefill(model, tokens, settings.chunk, rec):
        pass
    layers, rel = [], []
    for i in range(len(model.model.layers)):
        err2, norm2 = np.array(rec.err2[i]), np.array(rec.norm2[i])
        layers.append(tuple(choose_patterns(err2, norm2, cands, settings.max_error, len(tokens), settings.chunk)))
        rel.append(np.sqrt(err2 / np.maximum(norm2, 1e-30)))
    return SearchResult(SparsePatternConfig(tuple(layers)), np.stack(rel), cands, time.perf_counter() - t0)


def rechoose(result: SearchResult, max_error: float, kv_len: int, q_len: int = 512) -> SparsePatternConfig:
    """The config another max_error would give, from the recorded errors (no new prefill)."""
    layers = [tuple(choose_patterns(r**2, np.ones(r.shape[1]), result.candidates, max_error, kv_len, q_len))
              for r in result.rel_errors]
    return SparsePatternConfig(tuple(layers))


def summary(config: SparsePatternConfig) -> str:
    counts: dict[str, int] = {}
    for heads in config.layers:
        for p in heads:
            counts[p.kind] = counts.get(p.kind, 0) + 1
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items()))
