"""Model sources a user of mlx_lm.server expects: an mlx-lm directory, a Hugging Face-format
checkpoint directory (bf16 safetensors + config + tokenizer) and a hub id resolved through a
pre-populated Hugging Face cache with HF_HUB_OFFLINE=1 (nothing is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_loom.models.loader import load_model
from tiny_archs import make_tiny_arch_dir


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


def test_hub_id_resolves_through_the_offline_cache(tmp_path):
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-qwen3" / "snapshots" / ("0" * 40)
    make_tiny_arch_dir(snapshot, "qwen3")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("from mlx_loom.models.loader import load_model; m = load_model('tiny-org/tiny-qwen3'); "
            "print(m.name, m.num_layers)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["tiny-org/tiny-qwen3", "2"]
    missing = subprocess.run([sys.executable, "-c", code.replace("tiny-qwen3", "not-cached")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0  # offline and not cached: an error, never a download


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
