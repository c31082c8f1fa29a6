"""FedProx (Li et al. 2020), both halves: FedAvg on the server, a proximal term on the clients.

Each client adds (mu/2) ||w - w_start||^2 to its local loss, where w_start is the global adapter
the round started from: local training stays near it, which damps client drift on non-IID data.
The server asks for it through the instruction's `client_hooks`: [{"name": "fedprox", "params": {"mu": mu}}].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flora.algorithms.base import ClientHook, HookSpec
from flora.algorithms.fedavg import FedAvg
from flora.algorithms.registry import register_client_hook, register_strategy


def check_mu(mu: Any) -> float:
    """mu must be a finite real number >= 0 (it may come from the network)."""
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"fedprox mu must be a finite number >= 0 (e.g. 0.01), got {mu!r}")
    return float(mu)


@register_strategy("fedprox")
class FedProx(FedAvg):
    """FedAvg on the server; every selected client runs the `fedprox` hook with this mu."""

    def __init__(self, mu: float = 0.01):
        super().__init__()
        self.mu = check_mu(mu)

    def client_hooks(self) -> list[HookSpec]:
        return [{"name": "fedprox", "params": {"mu": self.mu}}]


@register_client_hook("fedprox")
class ProximalTerm(ClientHook):
    """The client half: (mu/2) sum_p ||p - p_start||^2 over the trainable parameters."""

    adds_loss_term = True

    def __init__(self, mu: float = 0.01):
        self.mu = check_mu(mu)

    def loss_term(self, params: Mapping[str, Any], start: Mapping[str, Any]) -> Any:
        if self.mu == 0:
            return None
        return self.mu / 2 * sum(((p - start[name]) ** 2).sum() for name, p in params.items())
