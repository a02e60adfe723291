"""The package map of docs/ARCHITECTURE.md, checked from the import statements of every module.

Each package may import itself and packages of a lower rank only (no package imports one above
or beside it), no two modules import each other through any chain, and the pure-Python packages
never import mlx (checked by importing them in a subprocess with mlx blocked: test_imports.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_loom"

# package -> rank; a module may import from its own package or from packages of a lower rank.
RANKS = {
    "kernels": 0,
    "schemas": 1,
    "models": 1,
    "sched": 2,
    "sample": 3,
    "worker": 3,
    "spec": 4,
    "dist": 4,
    "engine": 5,
    "server": 6,
}
PURE_PACKAGES = ("sched",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, known: set[str]) -> set[str]:
    """mlx_loom modules imported by path's source (lazy and TYPE_CHECKING imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else None


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imported(p, known) - {m} for m, p in mods.items()}


def test_every_package_has_a_rank():
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages == set(RANKS), "give a new package its place in RANKS and in docs/ARCHITECTURE.md"


def test_packages_import_only_downward():
    wrong = []
    for mod, deps in import_graph().items():
        src = package_of(mod)
        if src is None:
            continue  # mlx_loom/__init__.py, __main__.py: the entry points
        for dep in deps:
            dst = package_of(dep)
            if dst is not None and dst != src and RANKS[dst] >= RANKS[src]:
                wrong.append(f"{mod} imports {dep} ({src} rank {RANKS[src]} -> {dst} rank {RANKS[dst]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules():
    graph = import_graph()
    # a package's __init__ is imported by every submodule import: count only its own imports
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + "."):
                continue  # a package importing its own submodule
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_pure_packages_import_no_mlx_statically():
    for mod, path in modules().items():
        if package_of(mod) in PURE_PACKAGES:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(n == "mlx" or n.startswith(("mlx.", "mlx_lm")) for n in names), mod


def test_no_re_export_shims_left_behind():
    """The engine's old home is gone, not kept as a forwarding package."""
    assert not (PACKAGE / "scheduler").exists()
