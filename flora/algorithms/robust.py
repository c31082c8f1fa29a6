"""Byzantine-robust aggregation: coordinate-wise median and trimmed mean.

Order statistics need every update at once, so these keep all accepted updates of a round in
memory (O(clients x adapter size); for the paper recipe 96 KiB per client).
"""

from __future__ import annotations

import numpy as np

from flora.algorithms.base import ClientUpdate, Strategy
from flora.algorithms.registry import register_strategy
from flora.algorithms.tensor_math import Tensors


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """Median over axis 0 (clients), element by element."""
    return np.median(stacked, axis=0)


def trimmed_mean(stacked: np.ndarray, trim_fraction: float) -> np.ndarray:
    """Drop the `trim_fraction` largest and smallest values per coordinate, average the rest."""
    n = stacked.shape[0]
    k = int(np.floor(trim_fraction * n))
    if 2 * k >= n:
        raise ValueError(f"trimming {k} from each end of {n} updates leaves nothing; lower trim_fraction")
    ordered = np.sort(stacked, axis=0)
    return ordered[k : n - k].mean(axis=0)


class _OrderStatistic(Strategy):
    def begin(self, round_: int, global_tensors: Tensors) -> None:
        self.global_tensors = global_tensors
        self._updates: list[Tensors] = []

    def accumulate(self, update: ClientUpdate) -> None:
        self._updates.append({k: np.asarray(update.tensors[k], dtype=np.float64) for k in self.global_tensors})

    def aggregate(self) -> Tensors:
        if not self._updates:
            raise ValueError(f"{self.name}: no accepted updates this round")
        return {
            name: self.combine(np.stack([u[name] for u in self._updates])).astype(np.float32)
            for name in self.global_tensors
        }


@register_strategy("median")
class Median(_OrderStatistic):
    def combine(self, stacked: np.ndarray) -> np.ndarray:
        return coordinate_median(stacked)


@register_strategy("trimmed_mean")
class TrimmedMean(_OrderStatistic):
    def __init__(self, trim_fraction: float = 0.1):
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = trim_fraction

    def combine(self, stacked: np.ndarray) -> np.ndarray:
        return trimmed_mean(stacked, self.trim_fraction)
