"""Server settings: the only place that reads the command line and the environment.

Precedence: command-line option > environment variable MLX_LOOM_<FIELD> > default.
Every field carries a help line; `mlx-loom serve --help` prints them all.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Mapping, Sequence

from mlx_loom.sched.config import SPEC_METHODS, CacheConfig, EngineConfig, SchedulerConfig, SpecConfig
from mlx_loom.models.model_source import check_model_arg

ENV_PREFIX = "MLX_LOOM_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _opt(default: object, help: str, flag: str | None = None, secret: bool = False) -> object:
    """A dataclass field with its CLI help (and an optional non-default flag name).

    A secret is left out of repr() and --help, so it never lands in a log or a terminal.
    """
    return field(default=default, repr=not secret, metadata={"help": help, "flag": flag, "secret": secret})


@dataclass(frozen=True)
class Settings:
    model: str | None = _opt(None, "A GGUF file, a model directory (mlx-lm or Hugging Face format) or a "
                                   "Hugging Face hub id (org/name: from the HF cache, downloaded when "
                                   "missing unless HF_HUB_OFFLINE=1) (default: the embedded "
                                   "SmolLM2-135M-Instruct GGUF).")
    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    port: int = _opt(8000, "TCP port to listen on.")
    served_model_name: str | None = _opt(None, "Model name reported by /v1/models and accepted in "
                                               "requests (default: the model's own name).")
    max_num_seqs: int = _opt(SchedulerConfig.max_num_seqs, "Most requests running in one engine step.")
    max_num_batched_tokens: int = _opt(SchedulerConfig.max_num_batched_tokens,
                                       "Token budget per engine step (decode rows cost 1, prefill chunks the rest).")
    max_model_len: int = _opt(SchedulerConfig.max_model_len,
                              "Longest prompt + completion accepted (capped by the model's own context).")
    long_prefill_chunk: int = _opt(SchedulerConfig.long_prefill_chunk,
                                   "While others decode or wait, a prompt takes at most this many tokens per "
                                   "step, so a long prompt never holds back a short request (0: no cap).")
    kv_cache_memory_gb: float = _opt(CacheConfig.kv_cache_memory_gb, "Memory for the paged KV cache, in GiB.")
    num_blocks: int | None = _opt(None, "Exact number of KV pages (overrides --kv-cache-memory-gb).")
    block_size: int = _opt(CacheConfig.block_size, "Tokens per KV page (a power of two).")
    dense_decode_kv_gb: float | None = _opt(None, "Models on the generic path: cap in GiB on the dense copy "
                                                  "of the decoding requests' KV kept across steps (default: "
                                                  "twice the KV cache's memory; 0: gather pages every step).")
    state_cache_memory_gb: float = _opt(CacheConfig.state_cache_memory_gb, "Hybrid models: memory for the "
                                        "per-request recurrent-state slots, in GiB (a full pool makes requests wait).")
    state_snapshot_memory_gb: float = _opt(CacheConfig.state_snapshot_memory_gb, "Hybrid models: memory for the "
                                           "state snapshots that make prefix caching work for them, in GiB.")
    enable_prefix_caching: bool = _opt(True, "Disable sharing KV pages between requests with the "
                                             "same prompt prefix.", flag="--no-prefix-caching")
    pipeline: bool = _opt(False, "Under mlx.launch with several ranks: pipeline parallel (each rank runs a "
                                 "contiguous share of the layers) instead of tensor parallel (each rank runs a "
                                 "share of every layer's heads). Ignored in one process.")
    group_timeout: float = _opt(EngineConfig.group_timeout_s, "Under mlx.launch: seconds a step may run before "
                                "rank 0 declares the group stalled (/health 503, every request failed).")
    group_start_timeout: float = _opt(EngineConfig.group_start_timeout_s, "Under mlx.launch: seconds every "
                                      "rank has to connect at start-up; past it the rank exits with status 1.")
    speculative: str | None = _opt(None, "Speculative decoding draft (ML-SpecQD): mxfp4, nvfp4 or mxfp8 (the "
                                         "model's own linear layers cast at load, no extra files) or a path to "
                                         "a smaller model with the same tokenizer. Off by default.")
    spec_k: int = _opt(SpecConfig.k, "Most draft tokens per request per step.")
    spec_level2: str = _opt(SpecConfig.level2, "Drafts for the draft: none, ngram (prompt lookup) or a path "
                                               "to a smaller model.")
    spec_mode: str = _opt(SpecConfig.mode, "auto: speculate only where the cost model measured at start-up "
                                           "predicts a speedup (off on MLX's CPU backend); always: every step.")
    sparse_prefill: str = _opt("off", "Sparse attention for long prompts (MInference): off, auto (the "
                                      "pattern config shipped for the model; used only where it pays) or "
                                      "a config path from `mlx-loom search-patterns`. Lossy, so off by default.")
    warmup: bool = _opt(True, "Skip the warm-up before ready (one decode step per batch-size bucket, a "
                              "prefill chunk and the sampler, run before /health says 200 so the first "
                              "requests do not pay kernel compilation).", flag="--no-warmup")
    async_decode: bool = _opt(True, "Run every decode step synchronously (read each step's tokens before the "
                                    "next is launched); by default a step is launched from the previous "
                                    "step's tokens still on the device.", flag="--no-async-decode")
    max_request_bytes: int = _opt(4 * 2**20, "Largest accepted request body in bytes (larger: 413).")
    max_queued_requests: int = _opt(256, "Requests that may wait beyond the --max-num-seqs running ones; "
                                         "more in flight get 429 with Retry-After (each of n choices counts).")
    api_key: str | None = _opt(None, "Require 'Authorization: Bearer <key>' on every /v1 route (/health, "
                                     "/metrics and /docs stay public). Prefer the env variable: a command "
                                     "line is visible to other users.", secret=True)
    shutdown_timeout: float = _opt(30.0, "Seconds in-flight requests may run after SIGTERM/SIGINT "
                                         "before they are stopped with a 503.")
    backlog: int = _opt(2048, "Listen backlog: connections the OS queues before the server accepts them.")
    log_level: str = _opt("info", f"Log level, one of {', '.join(LOG_LEVELS)}.")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be >= 1, got {self.backlog}")
        if self.api_key is not None and not self.api_key.strip():
            # An empty variable (MLX_LOOM_API_KEY=) must not silently turn authentication off.
            raise ValueError("api_key is empty; set a non-empty key or leave MLX_LOOM_API_KEY unset")
        if self.speculative is not None and self.speculative not in SPEC_METHODS \
                and not os.path.exists(self.speculative):
            raise ValueError(f"speculative must be one of {', '.join(SPEC_METHODS)} or a model path, "
                             f"got {self.speculative!r}")
        if self.spec_level2 not in ("none", "ngram") and not os.path.exists(self.spec_level2):
            raise ValueError(f"spec_level2 must be none, ngram or a model path, got {self.spec_level2!r}")
        if self.sparse_prefill not in ("off", "auto") and not os.path.exists(self.sparse_prefill):
            raise ValueError(f"sparse_prefill must be off, auto or a pattern config path, got {self.sparse_prefill!r}")
        if self.model is not None:
            check_model_arg(self.model)  # a hub id is resolved (cache or download) by the CLI / the loader

    def engine_config(self) -> EngineConfig:
        """The frozen engine config (its own checks name any bad value)."""
        return EngineConfig(
            model=self.model,
            cache=CacheConfig(block_size=self.block_size, num_blocks=self.num_blocks,
                              kv_cache_memory_gb=self.kv_cache_memory_gb,
                              enable_prefix_caching=self.enable_prefix_caching,
                              dense_decode_kv_gb=self.dense_decode_kv_gb,
                              state_cache_memory_gb=self.state_cache_memory_gb,
                              state_snapshot_memory_gb=self.state_snapshot_memory_gb),
            scheduler=SchedulerConfig(max_num_seqs=self.max_num_seqs,
                                      max_num_batched_tokens=self.max_num_batched_tokens,
                                      max_model_len=self.max_model_len,
                                      long_prefill_chunk=self.long_prefill_chunk),
            spec=SpecConfig(method=self.speculative, k=self.spec_k, level2=self.spec_level2, mode=self.spec_mode),
            sparse_prefill=self.sparse_prefill,
            warmup=self.warmup,
            async_decode=self.async_decode,
            parallel=None if launched_rank() is None else "pipeline" if self.pipeline else "tensor",
            group_timeout_s=self.group_timeout,
            group_start_timeout_s=self.group_start_timeout,
        )


def launched_rank(env: Mapping[str, str] | None = None) -> int | None:
    """This process's rank when a distributed launcher started it (mlx.launch's ring and JACCL set
    MLX_RANK, mpirun OMPI_COMM_WORLD_RANK / PMI_RANK); None when started alone."""
    env = os.environ if env is None else env
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return None


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    """One option per Settings field; defaults come from the environment when set there."""
    env = os.environ if env is None else env
    for f in fields(Settings):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        env_name = ENV_PREFIX + f.name.upper()
        default = _from_env(f, env[env_name]) if env_name in env else f.default
        if f.type == "bool":
            action = "store_false" if flag.startswith("--no-") else "store_true"
            help_text = f"{f.metadata['help']} [env {env_name}=true|false; now: {str(default).lower()}]"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=help_text)
        else:
            shown = "unset" if default is None else "set" if f.metadata["secret"] else "%(default)s"
            help_text = f"{f.metadata['help']} [env {env_name}; default: {shown}]"
            kind = _scalar_type(f.type)
            parser.add_argument(flag, dest=f.name, type=kind, default=default,
                                metavar=f.name.upper(), help=help_text)


def from_namespace(ns: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(ns, f.name) for f in fields(Settings)})


def load_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `serve`'s options (argv without the subcommand) and the environment."""
    parser = argparse.ArgumentParser(prog="mlx-loom serve")
    add_arguments(parser, env)
    return from_namespace(parser.parse_args(list(argv or [])))


def _scalar_type(type_name: str) -> type:
    for name, kind in (("int", int), ("float", float)):
        if type_name.startswith(name):
            return kind
    return str


def _from_env(f, raw: str) -> object:
    if f.type == "bool":
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()} must be true/false, got {raw!r}")
    try:
        return _scalar_type(f.type)(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {f.type}") from None


assert all(f.default is not MISSING for f in fields(Settings)), "every setting needs a default"
