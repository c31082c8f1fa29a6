"""Aggregation strategies, registered by name. Wrappers (clip, dp) are configured around any of them."""

from __future__ import annotations

from typing import Any

from coordinator.strategies.base import ClientUpdate, Strategy, Tensors, weighted_mean
from coordinator.strategies.fedavg import FedAvg, FedProx
from coordinator.strategies.fedopt import FedAdam, FedAvgM, FedYogi
from coordinator.strategies.lora import FFALoRA, SVDLoRA
from coordinator.strategies.robust import Median, TrimmedMean
from coordinator.strategies.wrappers import CentralDP, NormClipping

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, Median, TrimmedMean, FFALoRA, SVDLoRA)
}
WRAPPER_PARAMS = {"clip_norm", "noise_multiplier", "dp_seed"}


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Build `name` with `params`; `clip_norm` adds norm clipping, plus `noise_multiplier` central DP.

    Raises ValueError naming the valid parameters when one is unknown or out of range.
    """
    params = dict(params or {})
    wrapper = {k: params.pop(k) for k in list(params) if k in WRAPPER_PARAMS}
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    cls = STRATEGIES[name]
    try:
        strategy = cls(**params)
    except TypeError:
        import inspect

        valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(
            f"strategy {name!r} takes parameters {valid or 'none'} (plus clip_norm, noise_multiplier, dp_seed); "
            f"got {sorted(params)}"
        ) from None
    if "noise_multiplier" in wrapper:
        return CentralDP(
            strategy,
            clip_norm=float(wrapper.get("clip_norm", 1.0)),
            noise_multiplier=float(wrapper["noise_multiplier"]),
            seed=int(wrapper.get("dp_seed", 0)),
        )
    if "clip_norm" in wrapper:
        return NormClipping(strategy, max_norm=float(wrapper["clip_norm"]))
    return strategy


__all__ = [
    "STRATEGIES",
    "CentralDP",
    "ClientUpdate",
    "FFALoRA",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Median",
    "NormClipping",
    "SVDLoRA",
    "Strategy",
    "Tensors",
    "TrimmedMean",
    "make_strategy",
    "weighted_mean",
]
