"""One import namespace (mlx_loom), and the pure-Python parts (scheduler core, server) import without mlx."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = ["mlx_loom.scheduler.block_pool", "mlx_loom.scheduler.pipeline", "mlx_loom.scheduler.kv_cache_manager", "mlx_loom.scheduler.scheduler",
        "mlx_loom.scheduler.request", "mlx_loom.scheduler.params", "mlx_loom.scheduler.messages",
        "mlx_loom.scheduler.config", "mlx_loom.scheduler.tokenizer", "mlx_loom.scheduler.engine_info",
        "mlx_loom.scheduler.engine", "mlx_loom.scheduler.client", "mlx_loom.scheduler.spec.controller",
        "mlx_loom.scheduler.spec.acceptance", "mlx_loom.scheduler.spec.ngram", "mlx_loom.server.app"]


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
    import mlx_loom
    import mlx_loom.kernels
    import mlx_loom.scheduler
    import mlx_loom.scheduler.spec
    import mlx_loom.schemas
    import mlx_loom.server

    assert Path(mlx_loom.__file__).resolve().parent == ROOT / "mlx_loom"
    for pkg in (mlx_loom.kernels, mlx_loom.schemas, mlx_loom.scheduler, mlx_loom.server):
        assert Path(pkg.__file__).resolve().parent.parent == ROOT / "mlx_loom"
    assert Path(mlx_loom.scheduler.spec.__file__).resolve().parent.parent == ROOT / "mlx_loom" / "scheduler"


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
