"""The package's import structure: `common` is neutral ground, `coordinator` never reaches into
the node's process plumbing, and no two modules import each other (lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "node", "coordinator", "resbm")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (top level or lazily)."""
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "_pb" not in p.parts]
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        me, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {n for n in names if n in known and n != me}
        graph[me] = found
    return graph


def test_no_two_modules_import_each_other():
    graph = imports()
    pairs = sorted(
        {tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())}
    )
    assert pairs == [], pairs


def test_common_is_neutral_and_the_coordinator_leaves_node_process_alone():
    graph = imports()
    for mod, deps in graph.items():
        if mod.startswith("common"):
            assert not {d for d in deps if not d.startswith("common")}, mod
        if mod.startswith("coordinator"):
            assert "node.process" not in deps, mod


def test_no_mixins_in_the_node():
    """A class in node/ has at most one base (exceptions, enums, protocols and pydantic models
    aside): behaviour is composed from objects, not smeared over mixins sharing one `self`."""
    for path in (ROOT / "node").rglob("*.py"):
        if "_pb" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                assert len(node.bases) <= 1, f"{path.name}: class {node.name} has several bases"
