"""Aggregation strategies: small classes over typed updates, the math in pure functions.

A Strategy sees a round as: `begin` with the global adapter, `accumulate` each accepted update
as it arrives (streaming, so memory does not grow with the number of clients), then
`aggregate` to get the next global adapter. `state_dict` carries anything that must survive a
restart (server-optimizer moments, for strategies that have them).
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


class Strategy(abc.ABC):
    name: str = ""

    def configure_train(self, round_: int, settings: dict[str, Any]) -> dict[str, Any]:
        """Training settings sent to clients with the instruction (FedProx adds its mu here)."""
        return settings

    @abc.abstractmethod
    def begin(self, round_: int, global_tensors: Tensors) -> None: ...

    @abc.abstractmethod
    def accumulate(self, update: ClientUpdate) -> None: ...

    @abc.abstractmethod
    def aggregate(self) -> Tensors: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class FedAvg(Strategy):
    """McMahan et al.: the sample-count-weighted mean of the clients' adapters, accumulated online."""

    name = "fedavg"

    def begin(self, round_: int, global_tensors: Tensors) -> None:
        self._global = global_tensors
        self._sum: Tensors = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_tensors.items()}
        self._weight = 0.0

    def accumulate(self, update: ClientUpdate) -> None:
        for name, value in update.tensors.items():
            self._sum[name] += np.asarray(value, dtype=np.float64) * update.num_examples
        self._weight += update.num_examples

    def aggregate(self) -> Tensors:
        if self._weight == 0:
            raise ValueError("FedAvg: no accepted updates this round")
        return {k: (v / self._weight).astype(np.float32) for k, v in self._sum.items()}


STRATEGIES: dict[str, type[Strategy]] = {"fedavg": FedAvg}


def make_strategy(name: str, **params: Any) -> Strategy:
    return STRATEGIES[name](**params)
