"""mlx-loom engine: scheduler, paged KV cache, model runner, sampler, engine thread.

Importing the package loads an optimized BLAS (ctypes only, no mlx) so that whichever module
imports mlx later binds its GEMMs to it. The pure modules (config, params, request,
block_pool, kv_cache_manager, scheduler, messages, client) never import mlx.
"""

from mlx_loom.scheduler import blas as _blas

_blas.preload()
