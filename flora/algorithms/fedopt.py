"""Server-side optimizers on the pseudo-gradient (Reddi et al. 2021, Hsu et al. 2019).

The clients' weighted mean minus the current global adapter is treated as a gradient step
`delta`; the server applies momentum (FedAvgM) or an adaptive step (FedAdam, FedYogi). The
update rules are pure functions of (global, delta, moments) so they are tested by hand.
"""

from __future__ import annotations

import numpy as np

from flora.algorithms.fedavg import FedAvg
from flora.algorithms.registry import register_strategy
from flora.algorithms.tensor_math import Tensors


def fedavgm_step(weights: np.ndarray, delta: np.ndarray, momentum: np.ndarray, *, lr: float, beta: float):
    """v <- beta v + delta;  w <- w + lr v.  (lr=1, beta=0 is FedAvg.)"""
    momentum = beta * momentum + delta
    return weights + lr * momentum, momentum


def fedadam_step(weights, delta, m, v, *, lr: float, beta1: float, beta2: float, tau: float):
    """m <- b1 m + (1-b1) d;  v <- b2 v + (1-b2) d^2;  w <- w + lr m / (sqrt(v) + tau)."""
    m = beta1 * m + (1 - beta1) * delta
    v = beta2 * v + (1 - beta2) * delta**2
    return weights + lr * m / (np.sqrt(v) + tau), m, v


def fedyogi_step(weights, delta, m, v, *, lr: float, beta1: float, beta2: float, tau: float):
    """As FedAdam, but v <- v - (1-b2) d^2 sign(v - d^2): v grows more cautiously."""
    m = beta1 * m + (1 - beta1) * delta
    v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
    return weights + lr * m / (np.sqrt(v) + tau), m, v


class _ServerOptimizer(FedAvg):
    def aggregate(self) -> Tensors:
        mean = self.mean()
        out = dict(self.global_tensors)
        for name, avg in mean.items():
            current = np.asarray(self.global_tensors[name], dtype=np.float64)
            out[name] = self.step(name, current, avg - current).astype(np.float32)
        return out

    def _moment(self, key: str, like: np.ndarray) -> np.ndarray:
        if key not in self.moments:
            self.moments[key] = np.zeros_like(like, dtype=np.float64)
        return self.moments[key]

    def state_dict(self) -> Tensors:
        return {k: v.copy() for k, v in self.moments.items()}

    def load_state_dict(self, state: Tensors) -> None:
        self.moments = {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}


@register_strategy("fedavgm")
class FedAvgM(_ServerOptimizer):
    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9):
        super().__init__()
        self.server_lr, self.momentum = server_lr, momentum
        self.moments: Tensors = {}

    def step(self, name, weights, delta):
        new, self.moments[f"v/{name}"] = fedavgm_step(
            weights, delta, self._moment(f"v/{name}", weights), lr=self.server_lr, beta=self.momentum
        )
        return new


@register_strategy("fedadam")
class FedAdam(_ServerOptimizer):
    rule = staticmethod(fedadam_step)

    def __init__(self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__()
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.moments: Tensors = {}

    def step(self, name, weights, delta):
        new, self.moments[f"m/{name}"], self.moments[f"v/{name}"] = self.rule(
            weights,
            delta,
            self._moment(f"m/{name}", weights),
            self._moment(f"v/{name}", weights),
            lr=self.server_lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return new


@register_strategy("fedyogi")
class FedYogi(FedAdam):
    rule = staticmethod(fedyogi_step)
