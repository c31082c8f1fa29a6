"""FedAvg: the sample-weighted mean of the clients' adapters, accumulated as they arrive.

It is also the base of every mean-based strategy (FedProx, the server optimizers, FFA-LoRA), and
owns their one extension point: `add_mean_transform`, a function applied to the mean before it is
used. Central DP (dp.py) installs its noise there, so noise lands on the average and before any
server-optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flora.algorithms.base import ClientUpdate, Strategy
from flora.algorithms.registry import register_strategy
from flora.algorithms.tensor_math import Tensors

MeanTransform = Callable[[Tensors, int], Tensors]  # (mean, number of updates averaged) -> new mean


@register_strategy("fedavg")
class FedAvg(Strategy):
    """McMahan et al. 2017. Running weighted sums: memory is constant in the number of clients."""

    def __init__(self):
        self._mean_transforms: list[MeanTransform] = []

    def add_mean_transform(self, transform: MeanTransform) -> None:
        """Apply `transform(mean, count)` to every round's mean, after those added before it.

        Subclasses must call `super().__init__()`; wrappers call this instead of reaching inside.
        """
        self._mean_transforms.append(transform)

    def begin(self, round_: int, global_tensors: Tensors) -> None:
        self.global_tensors = global_tensors
        self._sum: Tensors = {
            k: np.zeros_like(v, dtype=np.float64) for k, v in self.expected_update(global_tensors).items()
        }
        self._weight = 0.0
        self._count = 0

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
        for transform in self._mean_transforms:
            mean = transform(mean, self._count)
        return mean

    def aggregate(self) -> Tensors:
        mean = self.mean()
        return {k: mean[k].astype(np.float32) if k in mean else v for k, v in self.global_tensors.items()}
