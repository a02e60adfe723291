"""The loader's class switches in one place: leaf modules of a loaded model become subclasses that
run the native CPU kernels inside the model's own code (affine quantized layers: qmm; 16-bit and
MXFP4 / NVFP4 layers: lowp; RMSNorm and RoPE: rope_norm; mlx-lm's SiLU-gated MLP classes:
activations). A module is switched only when its class is exactly one whose computation is known
(never a subclass, never because a probe agreed), and each switch is then checked against its own class on large inputs (route_check.py). Parameters and
names stay; only classes change. `unroute_model` undoes them, for benchmark peers that must run
MLX's and mlx-lm's own modules.
"""

from __future__ import annotations

import mlx.nn as nn

from mlx_loom.kernels import lowp, qmm
from mlx_loom.kernels.activations import route_gated_mlps
from mlx_loom.kernels.rope_norm import route_norm_rope_modules
from mlx_loom.kernels.route_check import own_class, verify_routes


def route_model(model: nn.Module) -> int:
    """Every switch that applies to `model`, each verified (a routed module that differs from its own
    class gets that class back, logged); returns how many modules stay switched."""
    switched = (qmm.route_quantized_modules(model) + lowp.route_lowp_modules(model) + route_norm_rope_modules(model)
                + route_gated_mlps(model))
    return switched - len(verify_routes(model)) if switched else 0


def unroute_model(model: nn.Module) -> int:
    """Give every switched module its own class back (the first class of its MRO not defined here)."""
    restored = 0
    for _, module in model.named_modules():
        own = own_class(module)
        if own is not type(module):
            module.__class__ = own
            restored += 1
    return restored
