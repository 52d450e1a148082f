"""The package layering (`ALLOWED` below): lower packages never import higher ones; passes never import compiler/backends."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "netsqueeze"
ALLOWED = {
    "errors": {"errors"},
    "ir": {"errors", "ir"},
    "dsl": {"errors", "dsl"},
    "frontends": {"errors", "ir", "frontends"},
    "backends": {"errors", "ir", "backends"},
    "passes": {"errors", "ir", "passes"},
    "compiler": {"errors", "ir", "dsl", "frontends", "backends", "passes", "compiler"},
}


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for n in names:
            parts = n.split(".")
            if parts[0] == "netsqueeze" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_floor_imports(floor: str) -> None:
    files = [PKG / "errors.py"] if floor == "errors" else sorted((PKG / floor).rglob("*.py"))
    assert files
    bad = {str(f.relative_to(PKG)): sorted(imported_packages(f) - ALLOWED[floor]) for f in files}
    assert {k: v for k, v in bad.items() if v} == {}
