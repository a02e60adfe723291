"""Engine configuration: built once, frozen. Values found at start-up live in RuntimeInfo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV page. Prefix sharing works at this granularity."""
    num_blocks: int | None = None
    """KV pages in the pool; None sizes the pool from kv_cache_memory_gb."""
    kv_cache_memory_gb: float = 0.5
    """Memory for the KV pool when num_blocks is None (0.5 GiB: ~11k tokens of the default model in float32)."""
    enable_prefix_caching: bool = True
    """Share full pages between requests with the same token prefix."""
    dense_decode_kv_gb: float | None = None
    """Cap on the dense copy of the decode group's KV that the generic path keeps across steps
    (decode_mirror.py; its attention reads it instead of gathering pages every step). None: twice
    the KV pool's memory (its rows are padded to the longest); 0: no copy. A group that does not
    fit gathers its pages."""
    num_state_slots: int | None = None
    """Hybrid models only: requests that can hold a recurrent state at once (one slot each, per SSM /
    linear-attention layer whatever the model's own cache keeps); None sizes the pool from
    state_cache_memory_gb, capped at max_num_seqs. A full pool makes requests wait."""
    state_cache_memory_gb: float = 0.5
    """Memory for the state slots when num_state_slots is None."""
    num_state_snapshots: int | None = None
    """Hybrid models with prefix caching: recurrent-state snapshots kept with the cached blocks (a
    prefix hit restores the deepest one); None sizes them from state_snapshot_memory_gb, 0 turns
    prefix caching off for hybrids."""
    state_snapshot_memory_gb: float = 0.5
    """Memory for the state snapshots when num_state_snapshots is None."""
    state_snapshot_interval: int = 64
    """Blocks between a hybrid prompt's snapshot points (its last full block is one too): a chunk
    ends there, so prefix hits can resume every interval * block_size tokens."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2, got {self.num_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_state_slots is not None and self.num_state_slots < 4:
            raise ValueError(f"num_state_slots must be >= 4 (the self-check runs four sequences), got {self.num_state_slots}")
        if self.state_snapshot_interval < 1:
            raise ValueError(f"state_snapshot_interval must be >= 1, got {self.state_snapshot_interval}")
        if self.state_snapshot_memory_gb < 0:
            raise ValueError(f"state_snapshot_memory_gb must be >= 0, got {self.state_snapshot_memory_gb}")
        if self.state_cache_memory_gb <= 0:
            raise ValueError(f"state_cache_memory_gb must be > 0, got {self.state_cache_memory_gb}")
        if self.dense_decode_kv_gb is not None and not self.dense_decode_kv_gb >= 0:
            raise ValueError(f"dense_decode_kv_gb must be >= 0, got {self.dense_decode_kv_gb}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    """Most requests running in one step (rows of the batch)."""
    max_num_batched_tokens: int = 512
    """Token budget per step: decode rows cost 1, prefill chunks fill the rest."""
    max_model_len: int = 8192
    """Longest prompt + output accepted."""
    long_prefill_chunk: int = 128
    """While other requests decode or wait, a prompt takes at most this many tokens per step, so a
    long prompt cannot hold the whole budget step after step (vLLM's long_prefill_token_threshold);
    alone, it takes the budget. 0: no cap."""

    def __post_init__(self) -> None:
        if self.long_prefill_chunk < 0:
            raise ValueError(f"long_prefill_chunk must be >= 0, got {self.long_prefill_chunk}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}) so every running request can decode"
            )


SPEC_METHODS = ("mxfp4", "nvfp4", "mxfp8")


@dataclass(frozen=True)
class SpecConfig:
    method: str | None = None
    """Level-1 draft: None (off), "mxfp4" / "nvfp4" / "mxfp8" (the target's own linear layers cast to
    that format at load, embeddings shared), or a path to a smaller model with the same tokenizer."""
    k: int = 4
    """Most draft tokens per row per step."""
    level2: str = "none"
    """Drafts for the level-1 draft: "none", "ngram" (prompt lookup) or a path to a smaller model."""
    mode: str = "auto"
    """"auto": speculate only when the cost model measured at start-up predicts >= min_speedup;
    "always": every eligible row, every step (for tests and acceptance measurements)."""
    min_speedup: float = 1.05

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 16:
            raise ValueError(f"spec k must be in 1..16, got {self.k}")
        if self.mode not in ("auto", "always"):
            raise ValueError(f"spec mode must be 'auto' or 'always', got {self.mode!r}")
        if self.level2 != "none" and self.method is None:
            raise ValueError("a level-2 drafter needs a level-1 draft (--speculative)")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None
    """Path to a GGUF file or an mlx-lm model directory; None = the embedded default model."""
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    spec: SpecConfig = SpecConfig()
    """Speculative decoding (off unless spec.method is set)."""
    sparse_prefill: str = "off"
    """MInference-style sparse attention for long prefill chunks: "off"; "auto" (the per-head pattern
    config shipped for the model in mlx_loom/kernels/patterns/, used only where the cost model says it pays);
    or a path to such a config (`mlx-loom search-patterns` writes one). Lossy, hence opt-in."""
    dequantize_on_cpu: bool = True
    """On the CPU device, expand quantized weights to float32 (MLX's CPU qmatmul is slow)."""
    warmup: bool = True
    """Before reporting ready, run each decode batch-size bucket, a prefill chunk and the sampler once
    (warm_up.py), so the first requests do not pay kernel compilation (GPU) or first-touch costs."""
    async_decode: bool = True
    """Launch a decode step before the previous step's tokens are read when it is determined
    without them (every row decodes, nobody waiting: pipeline.py); sampling, penalties and
    logprobs run on the device, grammar masks are filled while the next forward runs."""
    parallel: str | None = None
    """Under `mlx.launch` with more than one rank: "tensor" (mlx-lm's shard()) or "pipeline" (its
    pipeline()); None: one process (mlx_loom/dist/)."""
    group_timeout_s: float = 30.0
    """Over several ranks: a step (or idle ping) running longer than this means a rank is dead or
    stuck; rank 0 then answers /health 503 and fails every request."""
    group_start_timeout_s: float = 120.0
    """Over several ranks: seconds every rank has to connect at start-up (`mx.distributed.init`);
    past it the process prints its stack and exits 1 (mlx_loom/dist/group.py says why it must)."""
