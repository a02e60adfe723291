"""The pure-Python parts (scheduler core, server) must import without mlx."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE = ["scheduler.block_pool", "scheduler.kv_cache_manager", "scheduler.scheduler", "scheduler.request",
        "scheduler.params", "scheduler.messages", "scheduler.config", "scheduler.tokenizer",
        "scheduler.engine", "scheduler.client", "server.app"]


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


def test_top_level_packages_resolve_to_this_repo():
    import kernels
    import schemas
    import scheduler
    import server

    for pkg in (kernels, schemas, scheduler, server):
        assert Path(pkg.__file__).resolve().parent.parent == ROOT
