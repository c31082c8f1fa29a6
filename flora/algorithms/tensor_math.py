"""Pure NumPy helpers the server halves share: weighted means, differences, norms. Tested by hand."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

Tensors = dict[str, np.ndarray]


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
