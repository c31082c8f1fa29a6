"""The Strategy interface, the typed client update, and the shared pure helpers.

A Strategy sees a round as: `begin` with the global adapter, `accumulate` each accepted update
as it arrives, then `aggregate` to get the next global adapter. Linear strategies accumulate
running sums, so memory does not grow with the number of clients; order statistics (median,
trimmed mean) must keep every update and say so. `state_dict` holds what must survive a
restart (server-optimizer moments) as named arrays, saved beside the adapter in a checkpoint.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass
class ClientUpdate:
    node: str
    round: int
    tensors: Tensors
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0


def weighted_mean(items: Iterable[tuple[Tensors, float]]) -> Tensors:
    """sum_k w_k x_k / sum_k w_k, per tensor name. Pure; tested against hand-computed numbers."""
    total = 0.0
    acc: Tensors = {}
    for tensors, weight in items:
        if weight <= 0:
            raise ValueError(f"weights must be positive, got {weight}")
        total += weight
        for name, value in tensors.items():
            contribution = np.asarray(value, dtype=np.float64) * weight
            acc[name] = acc[name] + contribution if name in acc else contribution
    if total == 0:
        raise ValueError("no updates to average")
    return {name: (value / total).astype(np.float32) for name, value in acc.items()}


def subtract(a: Tensors, b: Tensors) -> Tensors:
    return {k: np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64) for k in b}


def global_norm(tensors: Tensors) -> float:
    """L2 norm over all tensors together, as if flattened into one vector."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in tensors.values())))


def as_float32(tensors: Tensors) -> Tensors:
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


class Strategy(abc.ABC):
    name: str = ""
    accepts_lower_rank: bool = False  # clients may send LoRA factors of a rank below the global one

    def configure_train(self, round_: int, settings: dict[str, Any]) -> dict[str, Any]:
        """Training settings sent to clients with the instruction (FedProx adds its mu here)."""
        return settings

    def expected_update(self, global_tensors: Tensors) -> Tensors:
        """The tensors a client must send back (FFA-LoRA: only the B matrices)."""
        return global_tensors

    @abc.abstractmethod
    def begin(self, round_: int, global_tensors: Tensors) -> None: ...

    @abc.abstractmethod
    def accumulate(self, update: ClientUpdate) -> None: ...

    @abc.abstractmethod
    def aggregate(self) -> Tensors: ...

    def round_metrics(self) -> dict[str, float]:
        """Scalars about the last aggregation, recorded in the round's metrics."""
        return {}

    def state_dict(self) -> Tensors:
        return {}

    def load_state_dict(self, state: Tensors) -> None:
        return None
