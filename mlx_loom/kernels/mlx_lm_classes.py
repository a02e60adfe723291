"""mlx-lm classes by name, for the exact-class lists that decide a switch, a head rule or a cache layout."""

from __future__ import annotations

import importlib


def mlx_lm_classes(*names: str) -> frozenset[type]:
    """The classes named "module" (its `Model`) or "module.Class" under mlx_lm.models; an older mlx-lm that
    lacks one is skipped (then no model of it is loaded either)."""
    out = set()
    for name in names:
        module, _, cls = name.partition(".")
        try:
            out.add(getattr(importlib.import_module(f"mlx_lm.models.{module}"), cls or "Model"))
        except (ImportError, AttributeError):
            continue
    return frozenset(out)
