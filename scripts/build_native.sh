#!/usr/bin/env bash
# Builds the native CPU kernels with PYTHON (a venv's interpreter) into the mlx_loom package it
# imports (python -m mlx_loom.kernels.native.build), with one policy for every install script:
#   - built and verified: exit 0;
#   - not attempted (no cmake / C++ compiler here, or MLX_LOOM_NATIVE_BUILD=0): a warning, exit 0;
#     mlx_loom.kernels.qmm then uses MLX's own ops;
#   - failed although cmake and a compiler are here: exit 1, so the install (and CI) fails instead
#     of quietly serving, and testing, the slow path.
# Usage: scripts/build_native.sh PYTHON [--output-dir DIR ...]
set -uo pipefail
PY=${1:?usage: $0 PYTHON [build.py options]}; shift
"$PY" -m mlx_loom.kernels.native.build --install-nanobind "$@"
rc=$?
case $rc in
    0) exit 0 ;;
    3) echo "warning: native kernels not built (see above); mlx_loom.kernels.qmm uses MLX's own ops" >&2
       exit 0 ;;
    *) echo "error: the native kernels failed to build although cmake and a C++ compiler are here (see" \
            "above); fix the build, or set MLX_LOOM_NATIVE_BUILD=0 to install without them" >&2
       exit 1 ;;
esac
