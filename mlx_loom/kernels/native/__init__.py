"""Native CPU kernels for MLX, as an MLX C++ extension (custom primitives + nanobind bindings).

The compiled module `_loom_native` is built by `build.py` (scripts/install.sh runs it); use it
through mlx_loom.kernels.qmm, which falls back to MLX's own ops when it is missing.
"""
