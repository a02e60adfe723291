"""Gated MLP activation. Reference: mlx.nn.silu(gate) * up.

MLX's CPU exp and sigmoid cost ~20 ns per element (scalar libm); power(2, x) is ~3x
cheaper, so on the CPU silu is written as x / (1 + 2^(-x log2 e)). At 100 tokens x 1536
this takes one SmolLM2 MLP activation from 3.3 ms to 1.2 ms.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

_LOG2E = 1.4426950408889634


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up, elementwise."""
    if mx.default_device() == mx.cpu:
        return gate * up / (1.0 + mx.power(2.0, gate * -_LOG2E))
    return silu_mul_reference(gate, up)


def silu_mul_reference(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up
