"""Package attributes imported on first use (PEP 562), so `import coordinator` or `import export` stays cheap.

A package's public names are listed once, with the module each lives in; the package's `__all__` is
their sorted keys. Nothing is imported until a name is used: `from export import run_infer` on an
inference-only device never imports PyTorch, although `export_and_validate` is in the same `__all__`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, resolving each name of `exports` from the module it maps to."""

    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(set(exports) | set(vars(sys.modules[package])))

    return __getattr__, __dir__
