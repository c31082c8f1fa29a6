"""The live registry of nodes, kept from their retained status messages and Last Wills."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Requirements:
    """Capability filters for selection, read from each node's retained status."""

    min_memory_mb: float | None = None  # free accelerator memory (GPU if any, else system RAM)
    needs_4bit: bool = False

    def met_by(self, capabilities: dict[str, Any]) -> bool:
        if self.needs_4bit and not capabilities.get("supports_4bit", False):
            return False
        if self.min_memory_mb is not None:
            free = capabilities.get("gpu_memory_free_mb", capabilities.get("memory_free_mb"))
            if not isinstance(free, (int, float)) or free < self.min_memory_mb:
                return False  # unknown memory counts as not enough: the requirement was asked for
        return True


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

    def online(self, recipe: str | None = None, requirements: Requirements | None = None) -> list[str]:
        """Online nodes (sorted, so selection is reproducible) on `recipe` that meet `requirements`."""
        return sorted(
            n.node
            for n in self.nodes.values()
            if n.state == "online"
            and (recipe is None or n.recipe in (None, recipe))
            and (requirements is None or requirements.met_by(n.capabilities))
        )

    def select(
        self,
        *,
        fraction: float,
        minimum: int,
        seed: int,
        recipe: str | None = None,
        requirements: Requirements | None = None,
    ) -> list[str]:
        candidates = self.online(recipe, requirements)
        count = min(len(candidates), max(minimum, round(fraction * len(candidates))))
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(candidates, size=count, replace=False).tolist()) if count else []

    def snapshot(self) -> dict[str, Any]:
        return {name: asdict(info) for name, info in self.nodes.items()}
