"""FedAvg and FedProx: the sample-weighted mean of the clients' adapters, accumulated as they arrive."""

from __future__ import annotations

from typing import Any

import numpy as np

from coordinator.strategies.base import ClientUpdate, Strategy, Tensors


class FedAvg(Strategy):
    """McMahan et al. 2017. Running weighted sums: memory is constant in the number of clients."""

    name = "fedavg"

    def begin(self, round_: int, global_tensors: Tensors) -> None:
        self.global_tensors = global_tensors
        self._sum: Tensors = {
            k: np.zeros_like(v, dtype=np.float64) for k, v in self.expected_update(global_tensors).items()
        }
        self._weight = 0.0
        self._count = 0
        # Wrappers (central DP) transform the mean before it is used: noise belongs on the average,
        # before any server optimizer step.
        self.mean_hooks: list = getattr(self, "mean_hooks", [])

    def weight_of(self, update: ClientUpdate) -> float:
        return float(update.num_examples)

    def accumulate(self, update: ClientUpdate) -> None:
        weight = self.weight_of(update)
        for name in self._sum:
            self._sum[name] += np.asarray(update.tensors[name], dtype=np.float64) * weight
        self._weight += weight
        self._count += 1

    def mean(self) -> Tensors:
        if self._weight == 0:
            raise ValueError(f"{self.name}: no accepted updates this round")
        mean = {k: v / self._weight for k, v in self._sum.items()}
        for hook in self.mean_hooks:
            mean = hook(mean, self._count)
        return mean

    def aggregate(self) -> Tensors:
        mean = self.mean()
        return {k: mean[k].astype(np.float32) if k in mean else v for k, v in self.global_tensors.items()}


class FedProx(FedAvg):
    """Li et al. 2020: FedAvg on the server; clients add (mu/2)||w - w_global||^2 to their local loss."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01):
        if mu < 0:
            raise ValueError(f"fedprox mu must be >= 0, got {mu}")
        self.mu = mu

    def configure_train(self, round_: int, settings: dict[str, Any]) -> dict[str, Any]:
        return {**settings, "proximal_mu": self.mu}
