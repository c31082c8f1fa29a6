"""The curated public API: every name a package lists in `__all__` resolves, and importing a role is cheap."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = [
    "flora",
    "flora.algorithms",
    "flora.data",
    "flora.modeling",
    "flora.protocol",
    "flora.transport",
    "coordinator",
    "edge_client",
    "export",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, f"{package} exports nothing"
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
    assert set(module.__all__) <= set(dir(module))


def test_an_unknown_name_is_an_attribute_error():
    import coordinator

    with pytest.raises(AttributeError, match="has no attribute 'Coordinatr'"):
        coordinator.Coordinatr  # noqa: B018


def test_importing_the_packages_and_the_inference_entry_point_loads_no_torch():
    # An inference-only device has no PyTorch: `from export import run_infer` must work there.
    code = (
        "import sys, coordinator, edge_client, export, flora.modeling, flora.data\n"
        "from export import run_infer, Manifest\n"
        "from coordinator import CoordinatorConfig\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
