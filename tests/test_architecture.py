"""The dependency rule of DESIGN.md, enforced: roles never import each other; the core imports no role."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"edge_client", "coordinator", "export"}
COMPOSITION_ROOTS = {"flora/cli.py", "flora/demo.py"}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def violations() -> list[str]:
    bad = []
    for package in ["flora", *sorted(ROLES)]:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in COMPOSITION_ROOTS:
                continue
            forbidden = ROLES if package == "flora" else ROLES - {package}
            for name in sorted(imported_packages(path) & forbidden):
                bad.append(f"{rel} imports {name}")
    return bad


def test_roles_and_core_respect_the_dependency_rule():
    assert violations() == []


def test_the_checker_catches_a_violation(tmp_path, monkeypatch):
    # The rule must be able to fail: plant a core module that imports a role.
    fake = tmp_path / "flora"
    fake.mkdir()
    (fake / "bad.py").write_text("from coordinator.server import Coordinator\n")
    for role in ROLES:
        (tmp_path / role).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations() == ["flora/bad.py imports coordinator"]
