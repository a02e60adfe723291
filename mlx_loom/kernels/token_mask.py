"""Apply per-row allowed-token bitmasks to logits in one MLX op (structured output).

llguidance's own MLX helper is a Metal kernel (fails on Linux); this unpacks the int32 words
with shifts, which every backend runs. Reference: numpy unpackbits.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

_BITS = mx.arange(32, dtype=mx.int32)
mx.eval(_BITS)  # evaluated here: a lazy array made on one thread fails to evaluate on another


@mx.compile
def _masked(logits: mx.array, bitmask: mx.array) -> mx.array:
    S, V = logits.shape
    allowed = ((bitmask[:, :, None] >> _BITS) & 1).reshape(S, -1)[:, :V]  # [S, W*32] -> [S, V]
    return mx.where(allowed.astype(mx.bool_), logits, -mx.inf)


def apply_token_bitmask(logits: mx.array, bitmask: mx.array) -> mx.array:
    """logits [S, V], bitmask int32 [S, W] with W*32 >= V -> logits, disallowed tokens at -inf."""
    assert bitmask.shape[1] * 32 >= logits.shape[1], (bitmask.shape, logits.shape)
    return _masked(logits, bitmask)


def apply_token_bitmask_reference(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    S, V = logits.shape
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :V]
    return np.where(bits.astype(bool), logits, -np.inf).astype(logits.dtype)
