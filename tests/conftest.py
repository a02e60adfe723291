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
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    from mlx_loom.models.loader import load_model

    return load_model(None)


@pytest.fixture(scope="module")
def tok():
    """The embedded model's tokenizer, read from its GGUF metadata."""
    import mlx_loom.kernels  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx
    from mlx_loom.models.loader import default_model_path
    from mlx_loom.models.tokenizer import TextTokenizer

    _, metadata = mx.load(default_model_path(), return_metadata=True)
    return TextTokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def backend(tok):
    """llguidance's grammar backend over the embedded model's tokenizer."""
    from mlx_loom.schemas.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tok)


# -- CI: every skip is listed, and only justified ones pass --
# CI runs on a CPU machine with cmake and a C++ compiler, so nothing should skip there: a native
# kernel test that skips means the default path went untested. Skips CI may take, with the reason:
CI_ALLOWED_SKIPS: dict[str, str] = {
    # "tests/test_x.py::test_y": "why this cannot run on CI",
}
_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.section(f"skipped tests: {len(_skipped)}")
    for nodeid, reason in _skipped:
        why = CI_ALLOWED_SKIPS.get(nodeid.split("[")[0])
        terminalreporter.write_line(f"{nodeid}: {reason}" + (f" (allowed on CI: {why})" if why else ""))


def pytest_sessionfinish(session):
    import os

    unjustified = [n for n, _ in _skipped if n.split("[")[0] not in CI_ALLOWED_SKIPS]
    if os.environ.get("CI") == "true" and unjustified and session.exitstatus == 0:
        print(f"\nCI: {len(unjustified)} skipped test(s) not in tests/conftest.py CI_ALLOWED_SKIPS: "
              f"{unjustified[:10]}", file=sys.stderr)
        session.exitstatus = 1
