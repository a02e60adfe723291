"""Turning logits into tokens: the batched sampler and the per-request grammar matchers.

sampler (temperature, top-k/p, min-p, penalties, logit_bias, seeds, logprobs; on the device when
it can), structured (llguidance matchers per row: token masks, advancing, rollback).
"""

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before any mlx import)
