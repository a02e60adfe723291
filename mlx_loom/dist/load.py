"""Load this rank's shard of the model with mlx-lm's own sharding, and agree on it with every rank.

Tensor parallel runs the model's own `shard()` (attention heads and MLP columns split, the
`sharded-to-all` projections sum over the group); pipeline parallel its own `model.pipeline()`
(contiguous layers per rank, the hidden state sent on and all-gathered). These are the steps of
`mlx_lm.utils.sharded_load` minus its download (the model is a local directory on every rank).
A model that defines neither for the asked mode is refused with the list of those that do.

The start-up check (`agree`) all-gathers one int32 row per rank: a fingerprint of the model's
config, its weight files and the engine configuration, this rank's share and its KV page count.
A rank whose fingerprint differs from rank 0's is refused on every rank, by name.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_loom.models.layout import UnsupportedModelError, kv_layout, model_type
from mlx_loom.models.loader import LoadedModel
from mlx_loom.models.model_source import is_hub_id, resolve_hub_model
from mlx_loom.models.tokenizer import TextTokenizer
from mlx_loom.models.weight_arena import pack_parameters, packing_enabled
from mlx_loom.sched.config import EngineConfig
from mlx_loom.worker.kv_pools import KVPools

MODES = ("tensor", "pipeline")
_FINGERPRINT = 8  # int32 words of the sha256 each rank sends


@dataclass(frozen=True)
class Share:
    """What one rank holds: attention heads (tensor parallel) or layers [first, end) (pipeline)."""

    rank: int
    heads: int
    kv_heads: int
    first_layer: int
    end_layer: int

    def describe(self, mode: str) -> dict:
        if mode == "tensor":
            return {"rank": self.rank, "heads": self.heads, "kv_heads": self.kv_heads,
                    "layers": self.end_layer - self.first_layer}
        return {"rank": self.rank, "layers": [self.first_layer, self.end_layer]}


@dataclass(frozen=True)
class GroupModel:
    """This rank's shard, loaded and agreed on by every rank."""

    loaded: LoadedModel
    group: mx.distributed.Group
    mode: str
    shares: tuple[Share, ...]
    num_blocks: int  # KV pages every rank allocates (the smallest any rank's memory allows)

    @property
    def rank(self) -> int:
        return self.group.rank()

    def describe(self) -> dict:
        return {"world_size": self.group.size(), "mode": self.mode,
                "ranks": [s.describe(self.mode) for s in self.shares]}


def served_architectures(mode: str) -> list[str]:
    """mlx-lm model types whose code defines shard() (tensor) or pipeline() (pipeline)."""
    import mlx_lm.models as models

    marker = re.compile(r"def shard\(" if mode == "tensor" else r"PipelineMixin\b")
    root = Path(models.__file__).parent
    return sorted(p.stem for p in root.glob("*.py") if p.stem != "pipeline" and marker.search(p.read_text()))


def load_group_model(config: EngineConfig, mode: str, group: mx.distributed.Group) -> GroupModel:
    """Load and shard (every rank), then the start-up check; raises on a mismatch or an unserved model."""
    if mode not in MODES:
        raise ValueError(f"parallel mode must be one of {MODES}, got {mode!r}")
    path = config.model
    if path is not None and is_hub_id(path):  # the CLI downloaded it already (on every rank's machine)
        path = resolve_hub_model(path)
    if path is None or not Path(path).is_dir():
        raise UnsupportedModelError(f"serving over {group.size()} ranks needs an mlx-lm model directory or hub id "
                                    f"on every rank (got {path!r}); GGUF files are served by one process only")
    loaded = _load_shard(Path(path), mode, group)
    layout, _ = kv_layout(loaded.model)
    block_bytes = KVPools.bytes_per_block(layout, config.cache.block_size, loaded.dtype)
    own_blocks = config.cache.num_blocks or max(2, int(config.cache.kv_cache_memory_gb * 2**30 // block_bytes))
    rows = _all_gather_rows(group, [*_fingerprint(Path(path), config, mode, group.size()),
                                    *_share_words(loaded.model, mode), own_blocks])
    _refuse_mismatch(rows, group.rank())
    shares = tuple(Share(r, *map(int, row[_FINGERPRINT:_FINGERPRINT + 4])) for r, row in enumerate(rows))
    return GroupModel(loaded, group, mode, shares, int(min(row[-1] for row in rows)))


def _load_shard(path: Path, mode: str, group: mx.distributed.Group) -> LoadedModel:
    from mlx_lm.utils import load_model, load_tokenizer

    model, config = load_model(path, lazy=True, strict=False)
    _check_served(model, mode, group.size())
    if mode == "tensor":
        model.shard(group)
    else:
        model.model.pipeline(group)
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # as the one-process loader does on the CPU
    mx.eval(model.parameters())  # only this rank's weights are read
    if packing_enabled():
        pack_parameters(model)  # this rank's weights side by side (mlx_loom/models/weight_arena.py)
    tokenizer = load_tokenizer(path, {"trust_remote_code": True}, eos_token_ids=config.get("eos_token_id"))
    layout, dtype = kv_layout(model)
    args = model.args
    return LoadedModel(model=model, tokenizer=TextTokenizer.from_hf(tokenizer), name=path.name,
                       num_layers=len(layout), num_heads=int(getattr(args, "num_attention_heads", 0)),
                       num_kv_heads=layout[0].kv_heads, head_dim=layout[0].k_dim,
                       vocab_size=int(getattr(args, "vocab_size", 0) or tokenizer.vocab_size),
                       max_model_len=int(getattr(args, "max_position_embeddings", None) or 4096), dtype=dtype)


def _check_served(model: nn.Module, mode: str, size: int) -> None:
    kind = model_type(model)
    has = hasattr(model, "shard") if mode == "tensor" else hasattr(getattr(model, "model", None), "pipeline")
    if not has:
        how = "tensor parallel (mlx-lm's shard())" if mode == "tensor" else "pipeline parallel (mlx-lm's pipeline())"
        other = "; try --pipeline" if mode == "tensor" and hasattr(getattr(model, "model", None), "pipeline") else ""
        raise UnsupportedModelError(f"architecture {kind!r} cannot be served {how} over {size} ranks{other}; "
                                    f"served: {', '.join(served_architectures(mode))}")
    args = model.args
    heads = int(getattr(args, "num_attention_heads", 0) or 0)
    kv = int(getattr(args, "num_key_value_heads", None) or heads)
    if mode == "tensor" and (heads % size or kv % size):
        raise UnsupportedModelError(f"tensor parallel over {size} ranks splits attention heads evenly: "
                                    f"{kind} has {heads} heads and {kv} KV heads; use a world size dividing "
                                    f"{np.gcd(heads, kv)} or --pipeline")
    if mode == "pipeline" and len(model.layers) < size:
        raise UnsupportedModelError(f"pipeline parallel gives every rank a layer: {len(model.layers)} layers, "
                                    f"{size} ranks")


def _share_words(model: nn.Module, mode: str) -> list[int]:
    layers = [layer for layer in model.model.layers if layer is not None]
    attn = getattr(layers[0], "self_attn", None)
    heads, kv = int(getattr(attn, "n_heads", 0)), int(getattr(attn, "n_kv_heads", 0))
    if mode == "pipeline":
        return [heads, kv, int(model.model.start_idx), int(model.model.end_idx)]
    return [heads, kv, 0, len(layers)]


def _fingerprint(path: Path, config: EngineConfig, mode: str, size: int) -> list[int]:
    """sha256 of the model's config.json, its weight files' names and sizes, and the engine config."""
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(repr(replace(config, model=None)).encode())
    h.update(json.dumps([mode, size, version("mlx"), version("mlx-lm")]).encode())
    return np.frombuffer(h.digest()[:4 * _FINGERPRINT], dtype=np.int32).tolist()


def _all_gather_rows(group: mx.distributed.Group, row: list[int]) -> np.ndarray:
    out = mx.distributed.all_gather(mx.array(row, dtype=mx.int32), group=group, stream=mx.cpu)
    mx.eval(out)  # mx.eval lets other threads run while it waits for the slowest rank's load
    return np.array(out).reshape(group.size(), len(row))


def _refuse_mismatch(rows: np.ndarray, rank: int) -> None:
    differ = [r for r in range(len(rows)) if not np.array_equal(rows[r, :_FINGERPRINT], rows[0, :_FINGERPRINT])]
    if differ:
        raise RuntimeError(
            f"rank(s) {differ} started with a different model or configuration than rank 0 (config.json, "
            f"weight files, engine options, mlx / mlx-lm versions differ); every rank needs the same model "
            f"directory and the same `mlx-loom serve` options (this is rank {rank})")
