"""Loading never needs write access to a model file (issue 36).

MLX's GGUF reader opens the file O_RDWR ("[load_gguf] gguf_init failed" for a file the server cannot
write); mlx_loom/models/gguf_reader.py maps it read-only and must return what mx.load returns.
The serve tests put a GGUF file and a safetensors directory at mode 0444 in a 0555 directory and
serve them from a subprocess that cannot write them: as root (which ignores file modes) inside a
private mount namespace where that directory is a read-only bind mount, else as the current user
(0444 is not writable by its owner).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import gguf
import httpx
import mlx.core as mx
import numpy as np
import pytest

from mlx_loom.models.gguf_reader import GgufReadError, read_gguf
from mlx_loom.models.loader import default_model_path
from server_fixtures import free_port, wait_ready
from tiny_archs import make_tiny_arch_dir
from tiny_gguf import write_gguf

ROOT = Path(__file__).resolve().parents[1]
T = gguf.GGMLQuantizationType


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, T | None]], *, f64: bool = False) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if f64:  # mx.load crashes on a float64 scalar (MLX 0.32): only in files it does not read
        w.add_float64("test.f64", 0.25)
    w.add_string("general.name", "mixed")
    w.add_uint32("test.u32", 7)
    w.add_int64("test.i64", -5)
    w.add_float32("test.f32", 0.5)
    w.add_bool("test.flag", True)
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.floats", [0.5, 1.5])
    w.add_array("test.strings", ["a", "ß", ""])
    for name, (arr, kind) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _py(value):
    return value.tolist() if hasattr(value, "tolist") else value


def _assert_same(path: Path) -> None:
    ours, ours_meta = read_gguf(path)
    ref, ref_meta = mx.load(str(path), return_metadata=True)
    assert ours.keys() == ref.keys()
    for name, a in ref.items():
        b = ours[name]
        assert (b.dtype, b.shape) == (a.dtype, a.shape), name
        assert mx.array_equal(a, b).item(), name
    assert ours_meta.keys() == ref_meta.keys()
    for key, value in ref_meta.items():
        assert ours_meta[key] == pytest.approx(_py(value)) if isinstance(ours_meta[key], float) \
            else ours_meta[key] == _py(value), key


def test_reader_matches_mx_load_for_the_block_formats_mlx_reads(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 128)).astype(np.float32)
    tensors = {f"blk.0.{kind.name.lower()}.weight": (gguf.quants.quantize(a, kind), kind)
               for kind in (T.Q4_0, T.Q4_1, T.Q8_0)}
    tensors |= {"f32.weight": (a, None), "f16.weight": (a.astype(np.float16), None),
                "stacked.weight": (gguf.quants.quantize(rng.standard_normal((2, 3, 64)).astype(np.float32), T.Q8_0),
                                   T.Q8_0),
                "ids": (np.arange(5, dtype=np.int32), None)}
    _assert_same(_write(tmp_path / "mixed.gguf", tensors))


def test_reader_matches_mx_load_on_the_default_model():
    _assert_same(Path(default_model_path()))


def test_reader_dequantizes_other_block_formats_and_keeps_bf16(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    tensors = {"q5.weight": (gguf.quants.quantize(a, T.Q5_0), T.Q5_0),  # mx.load refuses Q5_0
               "bf16.weight": (gguf.quants.quantize(a, T.BF16), T.BF16)}
    ours, meta = read_gguf(_write(tmp_path / "other.gguf", tensors, f64=True))
    assert meta["test.f64"] == 0.25 and meta["test.strings"] == ["a", "ß", ""] and meta["test.flag"] is True
    q5 = gguf.quants.dequantize(tensors["q5.weight"][0], T.Q5_0)
    assert ours["q5.weight"].dtype == mx.float16 and np.allclose(np.array(ours["q5.weight"]), q5, atol=1e-2)
    assert ours["bf16.weight"].dtype == mx.bfloat16
    assert np.allclose(np.array(ours["bf16.weight"].astype(mx.float32)), a, rtol=1e-2)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"NOTGGUF" * 10, b"GGUF\x03\x00\x00\x00" + b"\xff" * 16])
def test_reader_refuses_a_broken_file_by_name(tmp_path, content):
    path = tmp_path / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufReadError, match="not a readable GGUF file"):
        read_gguf(path)


def test_reader_refuses_a_truncated_file_by_name(tmp_path):
    path = _write(tmp_path / "whole.gguf", {"f32.weight": (np.ones((4, 64), np.float32), None)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(GgufReadError, match="runs past the end of the file"):
        read_gguf(path)


# -- read-only files, served by a process that cannot write them --

@pytest.fixture
def readonly_dir(tmp_path):
    yield tmp_path / "ro"
    for p in [tmp_path / "ro", *(tmp_path / "ro").rglob("*")]:
        if p.is_dir():
            p.chmod(0o755)  # so pytest can delete it


def _make_readonly(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):  # files before their directories
        p.chmod(0o555 if p.is_dir() else 0o444)
    root.chmod(0o555)


# As root (which ignores file modes) the server runs in a private mount namespace where the model
# directory is also a read-only bind mount (a read-only volume); first it checks that the file
# cannot be opened for writing there (exit 97 if it can).
_RO_LAUNCH = ('mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 98; '
              'if (exec 3<>"$2") 2>/dev/null; then exit 97; fi; shift 2; exec "$@"')


def _launcher(root: Path, target: Path) -> list[str]:
    if os.geteuid() != 0:
        assert not os.access(target, os.W_OK)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare(1): cannot make a file unwritable for root")
    return ["unshare", "--mount", "sh", "-c", _RO_LAUNCH, "sh", str(root), str(target)]


def _serve_chat(model: Path, launcher: list[str], log: Path) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [*launcher, sys.executable, "-m", "mlx_loom.server.cli", "serve", "--model", str(model),
           "--port", str(port), "--no-warmup"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(base, proc, timeout=120)
        except Exception:
            if proc.poll() == 98:
                pytest.skip("no permission to bind-mount (a container without CAP_SYS_ADMIN?)")
            assert proc.poll() != 97, "the model file is writable in the test's read-only mount"
            raise AssertionError(f"server did not start; log:\n{log.read_text()[-3000:]}") from None
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("kind", ["gguf", "safetensors"])
def test_readonly_model_files_load_and_serve(readonly_dir, tmp_path, kind):
    if kind == "gguf":
        from mlx_lm.utils import load as mlx_lm_load

        source, _ = mlx_lm_load(str(make_tiny_arch_dir(tmp_path / "src", "qwen3")))
        readonly_dir.mkdir()
        model = target = write_gguf(source, "qwen3", readonly_dir / "tiny-q8.gguf", q8=True)
    else:
        model = make_tiny_arch_dir(readonly_dir / "tiny-qwen3", "qwen3")
        target = model / "model.safetensors"
    _make_readonly(readonly_dir)
    assert stat.S_IMODE(target.stat().st_mode) == 0o444
    out = _serve_chat(model, _launcher(readonly_dir, target), tmp_path / "server.log")
    assert out["choices"][0]["message"]["content"] is not None and out["usage"]["completion_tokens"] >= 1
