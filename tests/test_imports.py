"""One import namespace (mlx_loom), and the pure-Python parts (sched, the engine's client side, server) import without mlx."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = ["mlx_loom.sched", "mlx_loom.sched.block_pool", "mlx_loom.engine.pipeline", "mlx_loom.sched.kv_cache_manager", "mlx_loom.sched.scheduler",
        "mlx_loom.sched.request", "mlx_loom.sched.params", "mlx_loom.engine.messages",
        "mlx_loom.sched.config", "mlx_loom.models.tokenizer", "mlx_loom.engine.info",
        "mlx_loom.engine.thread", "mlx_loom.engine.client", "mlx_loom.spec.controller",
        "mlx_loom.spec.acceptance", "mlx_loom.spec.ngram", "mlx_loom.server.app"]


def test_pure_modules_import_without_mlx():
    code = (
        "import sys, importlib\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx' or name.startswith('mlx.') or name.startswith('mlx_lm'):\n"
        "            raise ImportError('mlx blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for m in {PURE!r}:\n"
        "    importlib.import_module(m)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_subpackages_resolve_to_this_repo():
    import importlib

    import mlx_loom

    assert Path(mlx_loom.__file__).resolve().parent == ROOT / "mlx_loom"
    for name in ("engine", "sched", "models", "worker", "sample", "spec", "kernels", "schemas", "server"):
        pkg = importlib.import_module(f"mlx_loom.{name}")
        assert Path(pkg.__file__).resolve().parent == ROOT / "mlx_loom" / name


def test_no_other_top_level_package_in_the_repo():
    """Nothing we ship sits at the top level, so no namesake (Hugging Face's `kernels`) is shadowed."""
    shipped = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert shipped == {"mlx_loom"}
    spec = importlib.util.find_spec("kernels")  # Hugging Face's, installed with transformers
    if spec is not None:
        assert "site-packages" in Path(spec.origin).resolve().parts


def test_python_dash_m_runs_the_console_script():
    res = subprocess.run([sys.executable, "-m", "mlx_loom", "serve", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "usage: mlx-loom serve" in res.stdout
