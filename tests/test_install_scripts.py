"""The native-kernel build policy of the install scripts (scripts/build_native.sh): a build that
fails although cmake and a C++ compiler are here fails the install; no tools is only a warning."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = ROOT / "scripts" / "build_native.sh"


def _run(cmd, env_update: dict, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "MLX_LOOM_NATIVE_BUILD"} | env_update
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake to reach the compile step")
def test_broken_compiler_fails_the_install(tmp_path):
    """cmake here, a compiler that fails (CXX=/bin/false): build.py exits 1 and the wrapper fails."""
    res = _run(["bash", str(WRAPPER), sys.executable, "--output-dir", str(tmp_path)], {"CXX": "/bin/false"})
    assert res.returncode == 1, res.stderr[-2000:]
    assert "failed to build although cmake and a C++ compiler are here" in res.stderr
    assert not list(tmp_path.glob("_loom_native*"))


def test_no_tools_is_only_a_warning(tmp_path):
    """No cmake and no compiler on PATH: not attempted (exit 3), the wrapper warns and exits 0."""
    (tmp_path / "bin").mkdir()
    env = {"PATH": str(tmp_path / "bin"), "CXX": ""}
    direct = _run([sys.executable, "-m", "mlx_loom.kernels.native.build", "--output-dir", str(tmp_path)], env)
    assert direct.returncode == 3, direct.stderr
    assert "needs cmake" in direct.stderr
    res = _run(["/bin/bash", str(WRAPPER), sys.executable, "--output-dir", str(tmp_path)], env)
    assert res.returncode == 0, res.stderr
    assert "warning: native kernels not built" in res.stderr


def test_opt_out_is_only_a_warning(tmp_path):
    res = _run(["bash", str(WRAPPER), sys.executable, "--output-dir", str(tmp_path)], {"MLX_LOOM_NATIVE_BUILD": "0"})
    assert res.returncode == 0, res.stderr
    assert "MLX_LOOM_NATIVE_BUILD=0: skipped" in res.stderr


@pytest.mark.parametrize("status,expected", [(0, 0), (3, 0), (1, 1), (2, 1), (139, 1)])
def test_wrapper_maps_exit_statuses(tmp_path, status, expected):
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexit {status}\n")
    fake.chmod(0o755)
    res = _run(["bash", str(WRAPPER), str(fake)], {})
    assert res.returncode == expected, res.stderr
