"""What the engine holds for a model, decided once at start-up: KV pages and (hybrids) state slots and
snapshots from memory, what a model with recurrent state runs without, the sparse-prefill patterns
and the structured-output backend that apply to it."""

from __future__ import annotations

import logging
from dataclasses import replace

from mlx_loom.models.loader import LoadedModel
from mlx_loom.sched.config import EngineConfig

log = logging.getLogger("mlx_loom.engine")


def default_num_blocks(cfg: EngineConfig, block_bytes: int, max_len: int) -> int:
    """KV pages from kv_cache_memory_gb; a model without KV layers (pure SSM) gets one context per row."""
    if block_bytes == 0:
        return max(2, -(-max_len // cfg.cache.block_size) * cfg.scheduler.max_num_seqs)
    return max(2, int(cfg.cache.kv_cache_memory_gb * 2**30 // block_bytes))


def num_state_slots(cfg: EngineConfig, slot_bytes: int) -> int | None:
    """State slots of a hybrid model (None: it keeps only KV): from memory, at most one per row, at
    least the self-check's four."""
    if slot_bytes == 0:
        return None
    if cfg.cache.num_state_slots is not None:
        return cfg.cache.num_state_slots
    fit = int(cfg.cache.state_cache_memory_gb * 2**30 // slot_bytes)
    if fit < 4:
        raise ValueError(f"one request's recurrent state takes {slot_bytes / 2**20:.1f} MB: give the state "
                         f"cache room for at least four ({cfg.cache.state_cache_memory_gb} GB holds {fit})")
    return min(fit, max(4, cfg.scheduler.max_num_seqs))


def num_state_snapshots(cfg: EngineConfig, slot_bytes: int, num_blocks: int) -> int:
    """Prefix snapshots of a hybrid's state (0: prefix caching off): from memory, at most one per block."""
    if not cfg.cache.enable_prefix_caching:
        return 0
    if cfg.cache.num_state_snapshots is not None:
        return cfg.cache.num_state_snapshots
    return min(num_blocks, int(cfg.cache.state_snapshot_memory_gb * 2**30 // slot_bytes))


def hybrid_config(cfg: EngineConfig, loaded: LoadedModel, num_snapshots: int) -> EngineConfig:
    """What a model with recurrent state runs without: speculative decoding is refused (a rejected
    draft would have to be rolled out of a state that cannot be rewound), and prefix caching is off
    without state snapshots (a recurrent state cannot be rebuilt from KV pages alone, so a page hit
    is not a reusable prefix)."""
    if cfg.spec.method is not None:
        raise ValueError(f"speculative decoding is not supported for {loaded.name}: it keeps recurrent state "
                         "(SSM / linear-attention layers) that a rejected draft would leave advanced; "
                         "serve it without --speculative")
    if cfg.cache.enable_prefix_caching and num_snapshots == 0:
        log.info("prefix caching off: %s keeps recurrent state and no state snapshot fits", loaded.name)
        cfg = replace(cfg, cache=replace(cfg.cache, enable_prefix_caching=False))
    return cfg


def sparse_config(setting: str, loaded: LoadedModel):
    """The sparse-prefill pattern config to use, or None (off, or no config for this model)."""
    if setting == "off":
        return None
    from mlx_loom.kernels.sparse_patterns import load_config, shipped_config_path

    path = shipped_config_path(loaded.name) if setting == "auto" else setting
    if path is None:
        log.warning("sparse prefill: no pattern config shipped for %s; prefill stays dense "
                    "(write one with `mlx-loom search-patterns` and pass its path)", loaded.name)
        return None
    config = load_config(path, num_heads=loaded.num_heads)
    if config.num_layers != loaded.num_layers:
        raise ValueError(f"sparse prefill config {path} has {config.num_layers} layers, the model "
                         f"{loaded.num_layers}: it was searched for another model")
    log.info("sparse prefill: per-head patterns from %s", path)
    return config


def grammar_backend(loaded: LoadedModel):
    """The structured-output backend for this tokenizer, or None (then constrained requests get a 400)."""
    try:
        from mlx_loom.schemas.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(loaded.tokenizer, vocab_size=loaded.vocab_size)
    except Exception as exc:  # an unsupported tokenizer must not stop free-text serving
        log.warning("structured output disabled: %s", exc)
        return None
