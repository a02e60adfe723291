"""Build the native MLX extension (mlx_loom/kernels/native/_loom_native*.so) for this interpreter.

    python -m mlx_loom.kernels.native.build [--output-dir DIR] [--build-dir DIR] [--install-nanobind]

CMake + a C++17/20 compiler + nanobind (the version MLX itself was built with: mx.array only
crosses into the extension when both use the same nanobind ABI). The module goes next to the
`mlx_loom.kernels.native` package this interpreter imports: the source tree for an editable install,
site-packages for `pip install .`. After building, the module is imported in a fresh process and
checked against mx.quantized_matmul; a module that fails the check is removed, so mlx_loom.kernels.qmm falls
back to MLX's own ops. Exit status 0 = built and verified; 1 = the build or its check failed although
the tools are here (reason on stderr); 3 = not attempted: MLX_LOOM_NATIVE_BUILD=0, or no cmake / C++
compiler on this machine. scripts/build_native.sh turns 1 into a failed install, 3 into a warning.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parent
SKIPPED = 3  # exit status: not attempted (no tools here, or MLX_LOOM_NATIVE_BUILD=0)
# MLX release -> the nanobind it was built with (checked: mx.array converts into the extension).
NANOBIND_FOR_MLX = {"0.32.3": "3.0.1", "0.32.4": "3.0.1"}

CHECK = """
import mlx.core as mx
from mlx_loom.kernels.native import _loom_native as n
W = mx.random.normal((13, 64), key=mx.random.key(0))
for bits in (4, 8):
    w, s, b = mx.quantize(W, group_size=32, bits=bits)
    for M in (1, 6):
        x = mx.random.normal((M, 64), key=mx.random.key(M))
        ref = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=32, bits=bits)
        out = n.affine_qmm(x, w, s, b, 32, bits)
        assert mx.allclose(out, ref, rtol=1e-4, atol=1e-4).item(), (bits, M)
print("mlx_loom.kernels.native._loom_native OK:", n.kernel_isa(), "kernels,", n.num_threads(), "threads")
"""


def log(msg: str) -> None:
    print(f"[mlx_loom.kernels.native.build] {msg}", file=sys.stderr, flush=True)


def mlx_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("mlx")
    except Exception:
        return None


def ensure_nanobind(install: bool) -> bool:
    want = NANOBIND_FOR_MLX.get(mlx_version() or "")
    try:
        from importlib.metadata import version

        have = version("nanobind")
    except Exception:
        have = None
    if have and (want is None or have == want):
        return True
    if not install:
        log(f"nanobind {want or '(any)'} needed, found {have}: pip install nanobind=={want}")
        return have is not None
    if want is None:
        log(f"no known nanobind pin for mlx {mlx_version()}; trying the latest nanobind")
    spec = f"nanobind=={want}" if want else "nanobind"
    log(f"installing {spec}")
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", spec]) == 0


def find_cmake() -> str | None:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the PyPI `cmake` wheel, if installed in this venv
        import cmake  # type: ignore

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except Exception:
        return None


def default_output_dir() -> Path:
    spec = importlib.util.find_spec("mlx_loom.kernels.native")
    if spec is None or not spec.submodule_search_locations:
        return SRC
    return Path(list(spec.submodule_search_locations)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", type=Path, default=None)
    ap.add_argument("--build-dir", type=Path, default=None, help="keep the CMake build here (default: temp dir)")
    ap.add_argument("--install-nanobind", action="store_true", help="pip install the nanobind matching mlx")
    args = ap.parse_args()

    if os.environ.get("MLX_LOOM_NATIVE_BUILD", "1") == "0":
        log("MLX_LOOM_NATIVE_BUILD=0: skipped")
        return SKIPPED
    cmake = find_cmake()
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cmake or not cxx:
        log(f"not built: needs cmake ({cmake or 'missing'}) and a C++ compiler ({cxx or 'missing'}); "
            "the pure-MLX path is used instead")
        return SKIPPED
    if not ensure_nanobind(args.install_nanobind):
        log("not built: nanobind is missing")
        return 1

    out_dir = (args.output_dir or default_output_dir()).resolve()
    build_dir = args.build_dir or Path(tempfile.mkdtemp(prefix="loom-native-build-"))
    cfg = [cmake, "-S", str(SRC), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
           f"-DLOOM_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    try:
        for cmd in (cfg, [cmake, "--build", str(build_dir), "--parallel"]):
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if res.returncode != 0:
                log(f"not built: {' '.join(cmd[:2])} failed:\n{res.stdout[-4000:]}")
                return 1
    finally:
        if args.build_dir is None:
            shutil.rmtree(build_dir, ignore_errors=True)

    built = sorted(out_dir.glob("_loom_native*.so")) + sorted(out_dir.glob("_loom_native*.pyd"))
    # Verify from a neutral cwd, importing kernels the way the server will.
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=tempfile.gettempdir(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             [str(out_dir.parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p])})
    if res.returncode != 0:
        for f in built:
            f.unlink(missing_ok=True)
        log(f"built but failed its check (removed; pure-MLX path used):\n{res.stdout[-4000:]}")
        return 1
    print(res.stdout.strip())
    for f in built:
        print(f"installed {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
