"""Model sources a user of mlx_lm.server expects: an mlx-lm directory, a Hugging Face-format
checkpoint directory (bf16 safetensors + config + tokenizer) and a hub id resolved through a
pre-populated Hugging Face cache with HF_HUB_OFFLINE=1 (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_loom.models.loader import load_model
from mlx_loom.models.model_source import ACCEPTED, ALLOW_PATTERNS
from tiny_archs import make_tiny_arch_dir

ROOT = Path(__file__).resolve().parents[1]


def test_hugging_face_format_bf16_checkpoint_dir(tmp_path):
    src = make_tiny_arch_dir(tmp_path / "src", "qwen3")
    weights = mx.load(str(src / "model.safetensors"))
    hf = tmp_path / "Qwen3-tiny-hf"
    shutil.copytree(src, hf)
    mx.save_safetensors(str(hf / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})
    loaded = load_model(str(hf))  # on the CPU: float32 for the engine
    assert loaded.name == "Qwen3-tiny-hf" and loaded.num_layers == json.loads((hf / "config.json").read_text())[
        "num_hidden_layers"]


def _offline_hub_cache(tmp_path: Path) -> dict[str, str]:
    """A Hugging Face cache holding tiny-org/tiny-qwen3 at main; the env that serves from it offline."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-qwen3" / "snapshots" / ("0" * 40)
    make_tiny_arch_dir(snapshot, "qwen3")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def test_hub_id_resolves_through_the_offline_cache(tmp_path):
    env = _offline_hub_cache(tmp_path)
    code = ("from mlx_loom.models.loader import load_model; m = load_model('tiny-org/tiny-qwen3'); "
            "print(m.name, m.num_layers)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["tiny-org/tiny-qwen3", "2"]
    missing = subprocess.run([sys.executable, "-c", code.replace("tiny-qwen3", "not-cached")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0  # offline and not cached: an error, never a download
    assert "HF_HUB_OFFLINE" in missing.stderr and ACCEPTED in missing.stderr


def _cli() -> list[str]:
    """The installed `mlx-loom` console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("mlx-loom")
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlx_loom.server.cli"]


def test_cli_serves_a_hub_id_from_the_offline_cache(tmp_path):
    """`mlx-loom serve --model org/name` as mlx_lm.server takes it: the settings check no longer refuses it."""
    import httpx

    from server_fixtures import free_port, wait_ready

    env, port = _offline_hub_cache(tmp_path), free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([*_cli(), "serve", "--model", "tiny-org/tiny-qwen3", "--port", str(port),
                                 "--no-warmup"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(base, proc, timeout=120)
        except Exception:
            raise AssertionError(f"server did not start; log:\n{log.read_text()[-3000:]}") from None
        assert [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]] == ["tiny-org/tiny-qwen3"]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_cli_names_the_accepted_forms_for_an_uncached_hub_id(tmp_path):
    env = _offline_hub_cache(tmp_path)
    proc = subprocess.run([*_cli(), "serve", "--model", "tiny-org/not-cached"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "'tiny-org/not-cached' is not in the Hugging Face cache" in proc.stderr
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in proc.stderr and ACCEPTED in proc.stderr
    bad = subprocess.run([*_cli(), "serve", "--model", "no/such/model"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist and is not a hub id" in bad.stderr and ACCEPTED in bad.stderr


def test_hub_downloads_fetch_what_mlx_lm_fetches():
    from mlx_lm import utils

    assert list(ALLOW_PATTERNS) == list(getattr(utils, "DEFAULT_ALLOW_PATTERNS", ALLOW_PATTERNS))


@pytest.mark.parametrize("arch,path", [("qwen3", "llama-flattened"), ("qwen2", "generic")])
def test_hf_directories_serve_chat_over_http(tmp_path, arch, path):
    """qwen3 takes the flattened path (llama + q/k norms), qwen2 its own code (biases)."""
    import httpx

    from mlx_loom.server.app import create_app
    from mlx_loom.server.settings import Settings
    from server_fixtures import serve_in_thread, wait_ready

    model_dir = make_tiny_arch_dir(tmp_path / f"{arch}-tiny", arch)
    with serve_in_thread(create_app(Settings(model=str(model_dir)))) as base:
        wait_ready(base, timeout=60)
        stats = httpx.get(base + "/v1/engine/stats").json()
        assert path in stats["backend"]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
