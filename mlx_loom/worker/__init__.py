"""Runs the model for one scheduled step over the paged KV cache.

runner (ModelRunner: the flattened fast paths and the generic path), generic_forward (the model's
own code over paged views), kv_pools (the paged KV pools and page helpers), paged_cache (mlx-lm's
cache protocol over the pools), decode_mirror (a dense copy of the decode group's KV kept across
steps), self_check (the load-time comparison with the model's own forward).
"""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before any mlx import)
