"""Settings and CLI: env + command line, --help documents every option, server imports no mlx."""

import subprocess
import sys
from dataclasses import fields

import pytest

from mlx_loom.server.cli import build_parser
from mlx_loom.server.settings import Settings, load_settings
from server_fixtures import ROOT


def test_defaults():
    s = load_settings([], env={})
    assert s == Settings()
    cfg = s.engine_config()
    assert cfg.model is None and cfg.cache.enable_prefix_caching and cfg.scheduler.max_num_seqs == s.max_num_seqs


def test_command_line_beats_env_beats_default():
    env = {"MLX_LOOM_PORT": "9001", "MLX_LOOM_MAX_NUM_SEQS": "7", "MLX_LOOM_ENABLE_PREFIX_CACHING": "false",
           "MLX_LOOM_KV_CACHE_MEMORY_GB": "0.25"}
    s = load_settings(["--port", "9002", "--served-model-name", "smol"], env=env)
    assert (s.port, s.max_num_seqs, s.enable_prefix_caching, s.kv_cache_memory_gb) == (9002, 7, False, 0.25)
    assert s.served_model_name == "smol"
    s = load_settings(["--no-prefix-caching", "--block-size", "32", "--num-blocks", "100"], env={})
    cfg = s.engine_config()
    assert not cfg.cache.enable_prefix_caching and cfg.cache.block_size == 32 and cfg.cache.num_blocks == 100


def test_bad_values_name_the_setting():
    with pytest.raises(ValueError, match="MLX_LOOM_PORT"):
        load_settings([], env={"MLX_LOOM_PORT": "eighty"})
    with pytest.raises(ValueError, match="log_level"):
        load_settings(["--log-level", "loud"], env={})
    with pytest.raises(ValueError, match="does not exist"):
        load_settings(["--model", "/no/such/model.gguf"], env={})
    with pytest.raises(ValueError, match="block_size"):
        load_settings(["--block-size", "12"], env={}).engine_config()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for f in fields(Settings):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in text, flag
        assert "MLX_LOOM_" + f.name.upper() in text.replace("\n", "").replace(" ", "")


def test_cli_rejects_missing_model_path():
    proc = subprocess.run([sys.executable, "-m", "mlx_loom.server.cli", "serve", "--model", "/no/such.gguf"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_server_package_never_imports_mlx():
    code = ("import sys, pkgutil, importlib, mlx_loom.server as server\n"
            "for m in pkgutil.walk_packages(server.__path__, 'mlx_loom.server.'): importlib.import_module(m.name)\n"
            "bad = sorted(k for k in sys.modules if k == 'mlx' or k.startswith(('mlx.', 'mlx_lm')))\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_admission_and_shutdown_options():
    s = load_settings([], env={})
    assert (s.max_queued_requests, s.api_key, s.shutdown_timeout, s.backlog) == (256, None, 30.0, 2048)
    env = {"MLX_LOOM_API_KEY": "sk-env", "MLX_LOOM_MAX_QUEUED_REQUESTS": "0", "MLX_LOOM_BACKLOG": "4096"}
    s = load_settings(["--shutdown-timeout", "2.5", "--max-queued-requests", "64"], env=env)
    assert (s.api_key, s.max_queued_requests, s.shutdown_timeout, s.backlog) == ("sk-env", 64, 2.5, 4096)
    for argv, name in ((["--max-queued-requests", "-1"], "max_queued_requests"),
                       (["--shutdown-timeout", "-1"], "shutdown_timeout"), (["--backlog", "0"], "backlog"),
                       (["--api-key", " "], "api_key")):
        with pytest.raises(ValueError, match=name):
            load_settings(argv, env={})


def test_api_key_never_shown(capsys, monkeypatch):
    s = load_settings(["--api-key", "sk-very-secret"], env={})
    assert "sk-very-secret" not in repr(s)
    monkeypatch.setenv("MLX_LOOM_API_KEY", "sk-env-secret")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "sk-env-secret" not in text and "MLX_LOOM_API_KEY" in text.replace("\n", "").replace(" ", "")


def test_serve_passes_backlog_and_shutdown_backstop():
    from mlx_loom.server.app import create_app
    from mlx_loom.server.graceful import BACKSTOP_S, make_server
    from server_fixtures import FakeEngineClient

    app = create_app(Settings(backlog=4096, shutdown_timeout=7), client=FakeEngineClient())
    server = make_server(app, "127.0.0.1", 8123)
    assert server.config.backlog == 4096 and server.config.timeout_graceful_shutdown == 7 + BACKSTOP_S


def test_speculative_options_reach_the_engine_config():
    from mlx_loom.sched.config import SpecConfig

    s = load_settings(["--speculative", "mxfp4", "--spec-k", "2", "--spec-level2", "ngram", "--spec-mode", "always"],
                      env={})
    assert s.engine_config().spec == SpecConfig(method="mxfp4", k=2, level2="ngram", mode="always")
    assert load_settings([], env={}).engine_config().spec.method is None
    with pytest.raises(ValueError, match="speculative must be one of mxfp4"):
        load_settings(["--speculative", "fp3"], env={})
    with pytest.raises(ValueError, match="spec_level2"):
        load_settings(["--speculative", "mxfp4", "--spec-level2", "bigram"], env={})
    with pytest.raises(ValueError, match="spec k"):
        load_settings(["--speculative", "mxfp4", "--spec-k", "0"], env={}).engine_config()
