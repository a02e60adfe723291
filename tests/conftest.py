import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M, loaded once per test session (4-bit on the native CPU kernels when
    they are built, else float32)."""
    import mlx_loom.scheduler  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.scheduler.model import load_model

    return load_model(None)
