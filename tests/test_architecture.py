"""The layers of docs/DESIGN.md, enforced: app above roles above core, and roles never import each other.

    flora.app                      may import anything
    coordinator, edge_client, export   may import the core; never each other, never flora.app
    flora (the core, minus app)    imports no role and not flora.app

There is no exception list: a module's layer follows from where it lives.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"edge_client", "coordinator", "export"}
APP = "flora.app"


def imported_modules(path: Path) -> set[str]:
    """Absolute module names imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer_of(rel: str) -> str:
    top = rel.split("/")[0]
    if rel.startswith("flora/app/"):
        return "app"
    return "role" if top in ROLES else "core"


def forbidden_for(rel: str) -> set[str]:
    """Top-level names (roles) and module prefixes (flora.app) this file may not import."""
    layer = layer_of(rel)
    if layer == "app":
        return set()
    own = rel.split("/")[0]
    return (ROLES - {own}) | {APP} if layer == "role" else ROLES | {APP}


def violations() -> list[str]:
    bad = []
    for package in ["flora", *sorted(ROLES)]:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            forbidden = forbidden_for(rel)
            hits = {
                name
                for module in imported_modules(path)
                for name in forbidden
                if module == name or module.startswith(name + ".")
            }
            bad.extend(f"{rel} imports {name}" for name in sorted(hits))
    return bad


def test_layers_respect_the_dependency_rule():
    assert violations() == []


def _plant(tmp_path: Path, rel: str, source: str) -> None:
    for package in ("flora", "flora/app", *ROLES):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(source)


def test_the_checker_catches_each_kind_of_violation(tmp_path, monkeypatch):
    # The rule must be able to fail, for every layer boundary.
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    _plant(tmp_path, "flora/bad_core.py", "from coordinator.server import Coordinator\n")
    _plant(tmp_path, "flora/bad_core_app.py", "def f():\n    from flora.app import cli\n")
    _plant(tmp_path, "export/bad_role.py", "import edge_client.trainer\n")
    _plant(tmp_path, "coordinator/bad_role_app.py", "from flora.app.demo import run_demo\n")
    _plant(tmp_path, "flora/app/fine.py", "import coordinator.server\nimport export.pipeline\n")
    assert violations() == [
        "flora/bad_core.py imports coordinator",
        "flora/bad_core_app.py imports flora.app",
        "coordinator/bad_role_app.py imports flora.app",
        "export/bad_role.py imports edge_client",
    ]
