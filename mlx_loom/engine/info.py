"""EngineInfo: what the loop side learns once the model has loaded.

Its own module so that the engine thread (engine.py) and the step logic (engine_core.py) both
import it without importing each other. Pure Python: no mlx.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_loom.models.tokenizer import TextTokenizer
from mlx_loom.schemas.grammar import GrammarBackend


@dataclass(frozen=True)
class EngineInfo:
    """What the loop side learns once the model has loaded."""

    model_name: str
    max_model_len: int
    tokenizer: TextTokenizer
    num_blocks: int
    block_size: int
    grammar: GrammarBackend | None = None
    """Compiles response_format / tool schemas (thread-safe); None if the tokenizer is unsupported."""
    backend: str = ""
    """What the engine runs on (mlx version, device, BLAS, matmul kernels), as measured at load."""
    warmup_seconds: float | None = None
    """How long the warm-up before ready took (None: skipped)."""
