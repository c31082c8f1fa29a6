"""The live registry of nodes, kept from their retained status messages and Last Wills.

A status is checked against its schema (flora/protocol/schema.py) before anything in it is kept: a status
that breaks it is dropped with a logged reason, and capabilities keep only well-formed, finite entries, so
what the registry holds is always valid for selection, weighting and the JSON checkpoint.

Statuses come off the network, and on an open broker anyone can announce any number of nodes, so what the
registry holds is bounded: a status payload is at most MAX_STATUS_BYTES (an honest one is well under 1 KB;
the coordinator drops a larger one before it is parsed into the registry), and at most `max_unknown_nodes`
nodes that are not known devices are kept (known: provisioned with a key, when the coordinator has device
keys). A newcomer beyond that evicts the unknown node that was offline longest, else the one seen longest ago.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from flora.algorithms import Candidate
from flora.errors import ProtocolError
from flora.protocol.envelope import minor
from flora.protocol.schema import check_data
from flora.records import json_safe
from flora.throttled_log import ThrottledLog

log = ThrottledLog(__name__)  # statuses come off the network: a flood of bad ones must not flood the log

MAX_STATUS_BYTES = 16 * 1024  # a status envelope, signature included: an honest one is a few hundred bytes
MAX_UNKNOWN_NODES = 2048  # nodes without a device key (all of them on an unsigned fleet): 4x the 500-client target


@dataclass(frozen=True)
class Requirements:
    """Capability filters for selection, read from each node's retained status."""

    min_memory_mb: float | None = None  # free accelerator memory (GPU if any, else system RAM)
    needs_4bit: bool = False

    def met_by(self, capabilities: dict[str, Any]) -> bool:
        return self.why_not(capabilities) is None

    def why_not(self, capabilities: dict[str, Any]) -> str | None:
        if self.needs_4bit and not capabilities.get("supports_4bit", False):
            return "no 4-bit support announced (require_4bit is on)"
        if self.min_memory_mb is not None:
            free = capabilities.get("gpu_memory_free_mb", capabilities.get("memory_free_mb"))
            if not isinstance(free, (int, float)) or free < self.min_memory_mb:
                # unknown memory counts as not enough: the requirement was asked for
                shown = "unknown" if not isinstance(free, (int, float)) else f"{free:.0f} MB"
                return f"free memory {shown}, below min_client_memory_mb {self.min_memory_mb:.0f}"
        return None


@dataclass
class NodeInfo:
    node: str
    state: str = "unknown"  # online | offline
    capabilities: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    last_seen: float = 0.0
    # 1.2 status fields (absent from older clients: then not compared)
    rank: int | None = None
    fingerprint: str | None = None
    last_round_trained: int | None = None
    protocol_minor: int | None = None  # the minor version its status was written in: the fields it knows (§9)
    instances: list[str] = field(default_factory=list)  # the last two process instances seen announcing this node
    ineligible: str | None = None  # why it cannot take part, as last logged


class Registry:
    def __init__(
        self, max_unknown_nodes: int = MAX_UNKNOWN_NODES, is_known: Callable[[str], bool] = lambda node: False
    ):
        self.nodes: dict[str, NodeInfo] = {}
        self.max_unknown_nodes = max_unknown_nodes
        self.is_known = is_known  # a provisioned device: never evicted (their number is the operator's)
        self.evicted = 0
        self._unknown: set[str] = set()  # nodes admitted without being known devices, the ones counted
        # Online by an old or retained status but not yet by an answer to the open presence request
        # (coordinator/presence.py): not offered for selection until they answer.
        self.unconfirmed: set[str] = set()

    def update(self, node: str, data: dict[str, Any], protocol: str | None = None) -> NodeInfo:
        """Apply `node`'s status (written in `protocol`, the envelope's version); one that breaks the status schema
        changes nothing (logged, never raised)."""
        try:
            data = check_data("status", data, sender=node)
        except ProtocolError as exc:
            known = self.nodes.get(node)
            previous = known.state if known is not None else "unknown"
            log.warning("bad-status", "dropped status from %s: %s; the node keeps its state %r", node, exc, previous)
            return known if known is not None else NodeInfo(node)
        if node not in self.nodes and not self.is_known(node):
            self._make_room_for_unknown(node)
            self._unknown.add(node)
        info = self.nodes.setdefault(node, NodeInfo(node))
        info.state = data["state"]
        if "capabilities" in data:
            info.capabilities = data["capabilities"]
        if "recipe" in data:
            info.recipe = data["recipe"]
        info.rank = data.get("rank", info.rank)
        info.fingerprint = data.get("model_fingerprint", info.fingerprint)
        info.last_round_trained = data.get("last_round_trained", info.last_round_trained)
        if protocol is not None:
            info.protocol_minor = minor(protocol)
        self._note_instance(info, data.get("instance"))
        info.last_seen = time.time()
        return info

    def _note_instance(self, info: NodeInfo, instance: str | None) -> None:
        """Statuses alternating between two process instances (a, b, a) are two devices with one node id: a
        restart gives a new instance once, never the old one back."""
        if instance is None or (info.instances and info.instances[-1] == instance):
            return
        if instance in info.instances:
            log.warning(
                f"duplicate {info.node}",
                "node %s is announced by two processes in turn (instances %s): another device is using node_id %s "
                "(a cloned SD card?); give each device its own node_id",
                info.node,
                " and ".join(info.instances),
                info.node,
            )
            info.instances.remove(instance)
        info.instances = [*info.instances[-1:], instance]

    def announced_examples(self, node: str) -> int | None:
        """The dataset size `node` announced in its status (capabilities `dataset_size`), if any."""
        info = self.nodes.get(node)
        return info.capabilities.get("dataset_size") if info is not None else None

    def _make_room_for_unknown(self, newcomer: str) -> None:
        if len(self._unknown) < self.max_unknown_nodes:
            return
        unknown = [self.nodes[node] for node in self._unknown]
        # Offline first (a departed node costs nobody anything), then the one not heard from for longest.
        victim = min(unknown, key=lambda info: (info.state == "online", info.last_seen))
        del self.nodes[victim.node]
        self._unknown.discard(victim.node)
        self.unconfirmed.discard(victim.node)
        self.evicted += 1
        log.warning(
            "evicted",
            "registry holds %d nodes that are not known devices (limit %d): forgot %s (%s) for %s",
            len(unknown),
            self.max_unknown_nodes,
            victim.node,
            victim.state,
            newcomer,
        )

    def online(
        self,
        recipe: str | None = None,
        requirements: Requirements | None = None,
        *,
        why_not: Callable[[NodeInfo], str | None] | None = None,
    ) -> list[str]:
        """Online nodes (sorted, so selection is reproducible) on `recipe` that meet `requirements` and for which
        `why_not` (coordinator/eligibility.py) finds nothing."""
        return sorted(
            n.node
            for n in self.nodes.values()
            if n.state == "online"
            and n.node not in self.unconfirmed
            and (recipe is None or n.recipe in (None, recipe))
            and (requirements is None or requirements.met_by(n.capabilities))
            and (why_not is None or why_not(n) is None)
        )

    def ineligible(self, why_not: Callable[[NodeInfo], str | None]) -> dict[str, str]:
        """The online nodes `why_not` refuses, with its reasons."""
        reasons = {n.node: why_not(n) for n in self.nodes.values() if n.state == "online"}
        return {node: why for node, why in reasons.items() if why is not None}

    def candidates(
        self,
        recipe: str | None = None,
        requirements: Requirements | None = None,
        *,
        why_not: Callable[[NodeInfo], str | None] | None = None,
    ) -> list[Candidate]:
        """The eligible nodes with their announced capabilities: what a strategy selects among."""
        return [
            Candidate(node, self.nodes[node].capabilities)
            for node in self.online(recipe, requirements, why_not=why_not)
        ]

    @staticmethod
    def sample(candidates: list[Candidate], *, fraction: float, minimum: int, seed: int) -> list[str]:
        """The seeded default selection: max(minimum, fraction x eligible) of them, at most all."""
        names = [c.node for c in candidates]
        count = min(len(names), max(minimum, round(fraction * len(names))))
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(names, size=count, replace=False).tolist()) if count else []

    def select(
        self,
        *,
        fraction: float,
        minimum: int,
        seed: int,
        recipe: str | None = None,
        requirements: Requirements | None = None,
    ) -> list[str]:
        return self.sample(self.candidates(recipe, requirements), fraction=fraction, minimum=minimum, seed=seed)

    def snapshot(self) -> dict[str, Any]:
        """JSON-able whatever was received (the checkpoint is strict JSON, and it must never fail on a device)."""
        return json_safe({name: asdict(info) for name, info in self.nodes.items()})


def checked_selection(chosen: Any, candidates: list[Candidate], strategy: str) -> list[str]:
    """A strategy's selection, sorted and de-duplicated; a node that is not eligible is a bug in the strategy."""
    eligible = {c.node for c in candidates}
    if isinstance(chosen, str) or not all(isinstance(n, str) for n in chosen):
        raise TypeError(f"strategy {strategy!r}: select() must return a list of node ids, got {chosen!r:.100}")
    stray = sorted(set(chosen) - eligible)
    if stray:
        raise ValueError(
            f"strategy {strategy!r} selected {stray}, which are not eligible this round; "
            "select() must return a subset of its candidates"
        )
    return sorted(set(chosen))
