"""The package layout of DESIGN.md, checked on the source: data flows one way
(data -> models -> inference -> experiments), experiments never import each other, and
module sizes stay within the budget of issue 18 (experiments 250 lines, library 600).

The known exceptions are listed by name: the test fails when a new one appears and
when a listed one is fixed (so the lists only shrink)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metaprior"

# layer -> packages it must not import
FORBIDDEN = {
    "data": ("metaprior.models", "metaprior.inference", "metaprior.experiments"),
    "models": ("metaprior.inference", "metaprior.experiments"),
    "inference": ("metaprior.experiments",),
}
KNOWN_LAYER_VIOLATIONS: set[tuple[str, str]] = set()

EXPERIMENT_LIMIT, LIBRARY_LIMIT = 250, 600
KNOWN_OVERSIZE: set[str] = set()


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_layers_import_one_way():
    found = set()
    for path in _modules():
        layer = _rel(path).split("/")[0]
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN.get(layer, ())):
                found.add((_rel(path), name))
    # `from metaprior.inference.x import y` records both the module and module.y
    found = {(p, n) for p, n in found if not any(n.startswith(m + ".") and (p, m) in found for _, m in found)}
    assert found == KNOWN_LAYER_VIOLATIONS


def test_experiments_do_not_import_each_other():
    experiments = {p.stem for p in (PACKAGE / "experiments").glob("*.py") if not p.stem.startswith("_")}
    for path in (PACKAGE / "experiments").glob("*.py"):
        for name in _imports(path):
            parts = name.split(".")
            if parts[:2] == ["metaprior", "experiments"] and len(parts) > 2 and parts[2] in experiments:
                pytest.fail(f"{_rel(path)} imports the experiment module {name}: move what it shares to the library")


def test_module_sizes():
    """Recipes (``experiments/NAME.py``) at most 250 lines; the library and the experiments'
    shared helpers (``experiments/_plots.py``...) at most 600."""
    over = set()
    for path in _modules():
        recipe = _rel(path).startswith("experiments/") and not path.name.startswith("_")
        limit = EXPERIMENT_LIMIT if recipe else LIBRARY_LIMIT
        if len(path.read_text().splitlines()) > limit:
            over.add(_rel(path))
    assert over == KNOWN_OVERSIZE
