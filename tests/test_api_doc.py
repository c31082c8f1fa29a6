"""docs/API.md is a script: its Python blocks run top to bottom, in a process of their own, and must pass.

A block that stops matching the API (a renamed argument, a changed return type) fails here, so the page
cannot drift from the code. Its own asserts check what each example claims.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "API.md"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_the_page_has_examples_for_each_role():
    script = "\n".join(python_blocks(API_DOC.read_text()))
    for name in ("build_coordinator", "build_agent", "export_and_validate", "run_infer", "register_strategy",
                 "register_client_hook", "subscribers="):  # fmt: skip
        assert name in script, name


@pytest.mark.slow
def test_every_example_in_api_md_runs(tmp_path):
    script = tmp_path / "api_examples.py"
    script.write_text("\n\n".join(python_blocks(API_DOC.read_text())))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "accuracy" in result.stdout
