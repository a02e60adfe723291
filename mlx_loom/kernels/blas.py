"""Load an optimized BLAS before MLX so MLX's CPU GEMMs bind to it.

The Linux mlx-cpu wheel links a reference BLAS (~5 GFLOP/s); a pthread OpenBLAS loaded with
RTLD_GLOBAL *before* `import mlx` wins symbol resolution and makes float32 GEMM ~30x faster.
Pure ctypes: importing this module never imports mlx.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

_CANDIDATES = (
    "/usr/lib/*/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
_loaded: str | None = None


def find_openblas() -> str | None:
    """Path of a system OpenBLAS, or None. `MLX_LOOM_BLAS` overrides ("none" disables)."""
    override = os.environ.get("MLX_LOOM_BLAS")
    if override:
        return None if override.lower() == "none" else override
    for pattern in _CANDIDATES:
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def preload() -> str | None:
    """Load OpenBLAS globally once; return its path (None if absent, off, or not Linux)."""
    global _loaded
    if _loaded is not None or sys.platform != "linux":
        return _loaded
    path = find_openblas()
    if path is None:
        return None
    if "mlx.core" in sys.modules:
        # Too late to win symbol resolution; say so rather than pretend.
        return None
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    _loaded = path
    return path


def loaded_path() -> str | None:
    return _loaded
