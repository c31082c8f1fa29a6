"""Measures shared by the export report and bench/inference.py: latency, agreement, accuracy.

NumPy only, so the same definitions serve the torch-free runtime and the benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np


def median_latency_ms(run: Callable[[], object], *, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of `run()` in milliseconds, after `warmup` untimed calls (allocations, caches)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Share of rows where both score the same label highest."""
    return float((np.argmax(logits_a, axis=1) == np.argmax(logits_b, axis=1)).mean())


def accuracy(logits: np.ndarray, labels: Sequence[int]) -> float:
    return float((np.argmax(logits, axis=1) == np.asarray(labels)).mean())
