"""Per-head sparse-prefill patterns (MInference's config shape) and the sparse/dense cost model.

A config is a list with one dict per layer, head index (a string, as JSON keys are) to
`[pattern, budget_a, budget_b, score]`, exactly MInference's `*_best_pattern.json` shape:

    [{"0": ["vertical_and_slash", 256, 512, 0.97], "1": ["a_shape", 64, 960, 0.99], ...}, ...]

| pattern              | budget_a                 | budget_b                       |
|----------------------|--------------------------|--------------------------------|
| `vertical_and_slash` | vertical columns         | slash keys (64-wide diagonals) |
| `a_shape`            | sink columns (first keys)| local window keys              |
| `block_sparse`       | keys (top 64-key blocks) | unused (0)                     |
| `dense`              | unused (0)               | unused (0)                     |

A budget that is an integer >= 1 counts keys; a float in (0, 1) is a fraction of the keys in
context (L), resolved per call. `score` is what the search measured, 1 - relative error of
the head's attention output (higher is better; informative only). MInference's A-shape name
`stream_llm` is accepted on load. Heads missing from a layer's dict run dense.

Pure Python (no mlx): the engine's settings can read a config without the kernels.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

TILE = 64  # query / key tile edge (MInference's block size)
EST_QUERIES = 64  # last queries of a chunk that estimate the vertical-slash index
KINDS = ("vertical_and_slash", "a_shape", "block_sparse", "dense")
_ALIASES = {"stream_llm": "a_shape", "vertical_slash": "vertical_and_slash"}
PATTERN_DIR = Path(__file__).resolve().parent / "patterns"

# Measured on the 2-core CPU against the native tiled dense attention
# (benchmarks/results/bench_sparse_prefill_kernels.md): one 512-query chunk with the shipped config
# takes ~1.0x dense time at L=2048 (est. ratio 0.60), 0.75x at 3072 (est. 0.44), 0.55-0.72x at
# 4096-8192 (est. 0.36-0.25): the index estimate and the gathers cost ~0.3x of dense. A chunk runs
# sparse when the estimated compute ratio is at most MAX_RATIO and it attends to at least MIN_KV_LEN
# keys. GPU backends have a fused dense SDPA and are unmeasured: the engine should keep them dense.
MAX_RATIO = 0.65
MIN_KV_LEN = 3072


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern; budgets as in the module table (int keys or a fraction of L)."""

    kind: str
    budget_a: float = 0
    budget_b: float = 0
    score: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown sparse pattern {self.kind!r}; expected one of {KINDS}")
        for b in (self.budget_a, self.budget_b):
            if b < 0 or (0 < b < 1 and self.kind == "dense"):
                raise ValueError(f"bad budget {b!r} for {self.kind}")

    def budgets(self, kv_len: int) -> tuple[int, int]:
        """(budget_a, budget_b) in keys for a context of kv_len keys."""
        return _resolve(self.budget_a, kv_len), _resolve(self.budget_b, kv_len)

    def to_json(self) -> list:
        return [self.kind, _plain(self.budget_a), _plain(self.budget_b), round(float(self.score), 4)]

    @classmethod
    def from_json(cls, item: Sequence) -> HeadPattern:
        kind = _ALIASES.get(item[0], item[0])
        score = float(item[3]) if len(item) > 3 else 1.0
        return cls(kind, float(item[1]), float(item[2]), score)


DENSE = HeadPattern("dense")


def _resolve(budget: float, kv_len: int) -> int:
    if 0 < budget < 1:
        return max(1, round(budget * kv_len))
    return int(budget)


def _plain(budget: float) -> float | int:
    return int(budget) if budget >= 1 or budget == 0 else float(budget)


@dataclass(frozen=True)
class SparsePatternConfig:
    """Patterns for every layer and query head: layers[i][h]."""

    layers: tuple[tuple[HeadPattern, ...], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer(self, i: int) -> tuple[HeadPattern, ...]:
        return self.layers[i]

    def to_json(self) -> list[dict[str, list]]:
        return [{str(h): p.to_json() for h, p in enumerate(heads)} for heads in self.layers]

    @classmethod
    def from_json(cls, data: list, num_heads: int | None = None) -> SparsePatternConfig:
        """MInference's list of per-layer dicts; heads missing from a dict are dense."""
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise ValueError("a sparse pattern config is a JSON list of per-layer {head: pattern} dicts")
        layers = []
        for d in data:
            n = num_heads or (max((int(h) for h in d), default=-1) + 1)
            layers.append(tuple(HeadPattern.from_json(d[str(h)]) if str(h) in d else DENSE for h in range(n)))
        return cls(tuple(layers))

    @classmethod
    def uniform(cls, pattern: HeadPattern, num_layers: int, num_heads: int) -> SparsePatternConfig:
        return cls(tuple(tuple([pattern] * num_heads) for _ in range(num_layers)))


def load_config(path: str | Path, num_heads: int | None = None) -> SparsePatternConfig:
    return SparsePatternConfig.from_json(json.loads(Path(path).read_text()), num_heads)


def save_config(config: SparsePatternConfig, path: str | Path) -> Path:
    """One layer per line: diffable, and still plain JSON."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(layer) for layer in config.to_json()]
    out.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    return out


def shipped_config_path(model_name: str) -> Path | None:
    """The config shipped in mlx_loom/kernels/patterns/ for a model name (e.g. 'SmolLM2-135M-Instruct.Q4_1')."""
    key = model_name.lower()
    for path in sorted(PATTERN_DIR.glob("*.json")):
        if path.stem in key:
            return path
    return None


# -- cost model --

def attended_keys(pattern: HeadPattern, kv_len: int) -> int:
    """Keys a query of the pattern scores at most (the tile form rounds key counts up to tiles)."""
    a, b = pattern.budgets(kv_len)
    if pattern.kind == "vertical_and_slash":
        return a + _tiles(b, 2) * TILE
    if pattern.kind == "a_shape":
        return a + _tiles(b, 1) * TILE
    if pattern.kind == "block_sparse":
        return _tiles(a, 1) * TILE
    return kv_len


def covers_all(pattern: HeadPattern, kv_len: int) -> bool:
    """True when the pattern's budget reaches every key, so dense is exact and no dearer."""
    return attended_keys(pattern, kv_len) >= kv_len


def head_cost(pattern: HeadPattern, q_len: int, kv_len: int) -> float:
    """Scores computed for one head of a chunk (q_len queries over kv_len keys), the unit of both
    the QK matmul and the exp2 softmax that dominate attention on the CPU; index estimation
    included (vertical-slash: the last 64 queries over all keys; block-sparse: pooled tiles)."""
    if covers_all(pattern, kv_len):
        return float(q_len * kv_len)
    q_pad = math.ceil(q_len / TILE) * TILE
    cost = q_pad * attended_keys(pattern, kv_len)
    if pattern.kind == "vertical_and_slash":
        cost += min(EST_QUERIES, q_len) * kv_len
    elif pattern.kind == "block_sparse":
        cost += math.ceil(q_len / TILE) * math.ceil(kv_len / TILE) * TILE
    return float(cost)


def _tiles(keys: int, minimum: int) -> int:
    return max(minimum, math.ceil(keys / TILE))


def estimated_compute_ratio(patterns: Sequence[HeadPattern], q_len: int, kv_len: int) -> float:
    """Sparse / dense attention cost of one layer's chunk under the cost model of head_cost."""
    dense = len(patterns) * q_len * kv_len
    return sum(head_cost(p, q_len, kv_len) for p in patterns) / max(dense, 1)


def should_use_sparse(kv_len: int, config: SparsePatternConfig, q_len: int = 512,
                      max_ratio: float = MAX_RATIO, min_kv_len: int = MIN_KV_LEN) -> bool:
    """Whether a prefill chunk of q_len queries over kv_len keys (its own included) should run
    sparse: long enough, and the estimated cost ratio, averaged over layers, low enough."""
    if kv_len < min_kv_len or q_len <= 1:
        return False
    return mean_compute_ratio(config, q_len, kv_len) <= max_ratio


@lru_cache(maxsize=4096)
def mean_compute_ratio(config: SparsePatternConfig, q_len: int, kv_len: int) -> float:
    """estimated_compute_ratio averaged over layers (cached: the engine asks once per chunk)."""
    ratios = [estimated_compute_ratio(heads, q_len, kv_len) for heads in config.layers]
    return sum(ratios) / len(ratios)
