"""The live registry of nodes, kept from their retained status messages and Last Wills."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class NodeInfo:
    node: str
    state: str = "unknown"  # online | offline
    capabilities: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    last_seen: float = 0.0


class Registry:
    def __init__(self):
        self.nodes: dict[str, NodeInfo] = {}

    def update(self, node: str, data: dict[str, Any]) -> NodeInfo:
        info = self.nodes.setdefault(node, NodeInfo(node))
        info.state = str(data.get("state", "unknown"))
        if isinstance(data.get("capabilities"), dict):
            info.capabilities = data["capabilities"]
        if data.get("recipe") is not None:
            info.recipe = str(data["recipe"])
        info.last_seen = time.time()
        return info

    def online(self, recipe: str | None = None) -> list[str]:
        """Online nodes (sorted, so selection is reproducible), optionally only those on `recipe`."""
        return sorted(
            n.node
            for n in self.nodes.values()
            if n.state == "online" and (recipe is None or n.recipe in (None, recipe))
        )

    def select(self, *, fraction: float, minimum: int, seed: int, recipe: str | None = None) -> list[str]:
        candidates = self.online(recipe)
        count = min(len(candidates), max(minimum, round(fraction * len(candidates))))
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(candidates, size=count, replace=False).tolist()) if count else []

    def snapshot(self) -> dict[str, Any]:
        return {name: asdict(info) for name, info in self.nodes.items()}
