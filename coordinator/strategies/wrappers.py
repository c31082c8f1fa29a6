"""Robustness wrappers around a strategy: per-client norm clipping and central differential privacy.

Both act on the client's *change* (its adapter minus the global one), the quantity whose size
a malicious or buggy client controls and whose sensitivity DP must bound.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from coordinator.strategies.base import ClientUpdate, Strategy, Tensors, global_norm, subtract
from coordinator.strategies.fedavg import FedAvg


def clip_update(update: Tensors, reference: Tensors, max_norm: float) -> tuple[Tensors, float, bool]:
    """Scale `update - reference` down to L2 norm `max_norm` if larger. Returns (tensors, norm, clipped)."""
    delta = subtract(update, reference)
    norm = global_norm(delta)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(reference[k], np.float64) + delta[k] * scale).astype(np.float32) for k in delta}
    return clipped, norm, scale < 1.0


class _Wrapper(Strategy):
    def __init__(self, inner: Strategy):
        self.inner = inner
        self.name = f"{type(self).name}({inner.name})"

    def configure_train(self, round_: int, settings: dict[str, Any]) -> dict[str, Any]:
        return self.inner.configure_train(round_, settings)

    def expected_update(self, global_tensors: Tensors) -> Tensors:
        return self.inner.expected_update(global_tensors)

    def begin(self, round_: int, global_tensors: Tensors) -> None:
        self.reference = self.inner.expected_update(global_tensors)
        self.norms: list[float] = []
        self.clipped = 0
        self.inner.begin(round_, global_tensors)

    def _clip(self, update: ClientUpdate, max_norm: float) -> ClientUpdate:
        tensors, norm, clipped = clip_update(update.tensors, self.reference, max_norm)
        self.norms.append(norm)
        self.clipped += clipped
        return replace(update, tensors=tensors)

    def aggregate(self) -> Tensors:
        return self.inner.aggregate()

    def round_metrics(self) -> dict[str, float]:
        metrics = dict(self.inner.round_metrics())
        if self.norms:
            metrics.update(update_norm_median=float(np.median(self.norms)), updates_clipped=float(self.clipped))
        return metrics

    def state_dict(self) -> Tensors:
        return self.inner.state_dict()

    def load_state_dict(self, state: Tensors) -> None:
        self.inner.load_state_dict(state)


class NormClipping(_Wrapper):
    """Bound every client's influence: its change is scaled to at most `max_norm` before aggregation."""

    name = "clip"

    def __init__(self, inner: Strategy, max_norm: float = 1.0):
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        super().__init__(inner)
        self.max_norm = max_norm

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(self._clip(update, self.max_norm))


class CentralDP(_Wrapper):
    """DP-FedAvg (McMahan et al. 2018) with a fixed number of clients per round.

    Each change is clipped to `clip_norm` and weighted equally, so one client moves the mean by at
    most clip_norm / n; Gaussian noise with std noise_multiplier * clip_norm / n is added to the
    mean, before any server optimizer step. The privacy accounting (epsilon over rounds) is left
    to the operator; the noise multiplier is reported every round.
    """

    name = "dp"

    def __init__(self, inner: Strategy, clip_norm: float = 1.0, noise_multiplier: float = 1.0, seed: int = 0):
        if not isinstance(inner, FedAvg):
            raise ValueError("central DP needs a mean-based strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi)")
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")
        super().__init__(inner)
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.rng = np.random.default_rng(seed)
        self.noise_std = 0.0
        inner.mean_hooks = [self._add_noise]

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(replace(self._clip(update, self.clip_norm), num_examples=1))

    def _add_noise(self, mean: Tensors, count: int) -> Tensors:
        self.noise_std = self.noise_multiplier * self.clip_norm / count
        return {k: v + self.rng.normal(0.0, self.noise_std, size=v.shape) for k, v in mean.items()}

    def round_metrics(self) -> dict[str, float]:
        return {**super().round_metrics(), "dp_noise_multiplier": self.noise_multiplier, "dp_noise_std": self.noise_std}
