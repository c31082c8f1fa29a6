"""Federated algorithms: each one's server half (a Strategy) and client half (a ClientHook) side by side.

    fedavg   FedAvg, the base of the mean-based strategies (and their `add_mean_transform` hook)
    fedprox  FedProx + the `fedprox` proximal-term client hook
    fedopt   FedAvgM, FedAdam, FedYogi (server optimizers)
    robust   Median, TrimmedMean
    lora     FFA-LoRA + the `ffa_lora` freeze-A client hook; SVD-LoRA; the aggregation-error meter
    dp       NormClipping and CentralDP wrappers; the `local_dp` client hook

Importing this package registers the built-ins; `register_strategy` / `register_client_hook` add
yours, and installed plugins come in through the `flora.strategies` / `flora.client_hooks` entry
points. Server halves need NumPy only; client halves import torch inside their methods.
"""

from flora.algorithms.base import Candidate, ClientHook, ClientUpdate, HookSpec, Strategy
from flora.algorithms.dp import CentralDP, LocalDP, NormClipping, clip_update
from flora.algorithms.fedavg import FedAvg, MeanTransform
from flora.algorithms.fedopt import FedAdam, FedAvgM, FedYogi
from flora.algorithms.fedprox import FedProx, ProximalTerm
from flora.algorithms.lora import AggregationErrorMeter, FFALoRA, FreezeLoraA, SVDLoRA
from flora.algorithms.registry import (
    WRAPPER_PARAMS,
    client_hook_class,
    client_hook_names,
    client_hooks_from_instruction,
    hook_specs,
    make_client_hook,
    make_strategy,
    register_client_hook,
    register_strategy,
    strategy_class,
    strategy_names,
)
from flora.algorithms.robust import Median, TrimmedMean
from flora.algorithms.tensor_math import Tensors, as_float32, global_norm, subtract, weighted_mean

__all__ = [
    "WRAPPER_PARAMS",
    "AggregationErrorMeter",
    "Candidate",
    "CentralDP",
    "ClientHook",
    "ClientUpdate",
    "FFALoRA",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "FreezeLoraA",
    "HookSpec",
    "LocalDP",
    "MeanTransform",
    "Median",
    "NormClipping",
    "ProximalTerm",
    "SVDLoRA",
    "Strategy",
    "Tensors",
    "TrimmedMean",
    "as_float32",
    "client_hook_class",
    "client_hook_names",
    "client_hooks_from_instruction",
    "clip_update",
    "global_norm",
    "hook_specs",
    "make_client_hook",
    "make_strategy",
    "register_client_hook",
    "register_strategy",
    "strategy_class",
    "strategy_names",
    "subtract",
    "weighted_mean",
]
