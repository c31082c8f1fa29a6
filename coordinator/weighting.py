"""How much each accepted update weighs, and the round's metrics weighted by it (docs/PROTOCOL.md §5.3).

FedAvg weights an update by its `num_examples`, which the device reports itself. Left alone, one device
claiming 10^9 examples would replace the global model with its own. So a weight is capped when the update
arrives (the streaming FedAvg needs it then) at the smaller of

- the `dataset_size` the device announced in its status, so an honest device (which reports the same count
  in both) always weighs exactly what it trained on, and a device cannot claim more than it announced;
- `max_weight_factor` x the median `dataset_size` announced by the nodes selected this round, so a device
  that also lies in its status weighs at most as much as that many typical devices. The median moves only
  if half of the selected nodes lie.

A capped update keeps the count it claimed in `ClientUpdate.claimed_examples`; the round record lists the
capped nodes (`weights_capped`) and a warning names each one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Iterable
from typing import Any

from coordinator.registry import Registry
from flora.algorithms import ClientUpdate

log = logging.getLogger(__name__)


def weight_limit(registry: Registry, node: str, selected: Iterable[str], factor: float | None) -> int | None:
    """The most examples `node`'s update may weigh this round, or None when nothing bounds it."""
    if factor is None:
        return None
    limits = []
    own = registry.announced_examples(node)
    if own is not None:
        limits.append(own)
    announced = [n for n in (registry.announced_examples(s) for s in selected) if n is not None]
    if announced:
        limits.append(max(1, math.floor(factor * statistics.median(announced))))
    return max(1, min(limits)) if limits else None


def cap_weight(update: ClientUpdate, registry: Registry, selected: Iterable[str], factor: float | None) -> ClientUpdate:
    """`update` with its weight capped (module docstring); unchanged when within the limit."""
    limit = weight_limit(registry, update.node, selected, factor)
    if limit is None or update.num_examples <= limit:
        return update
    log.warning(
        "round %d: %s claims %d examples; its FedAvg weight is capped at %d (it announced dataset_size %s; "
        "max_weight_factor %s x the selected nodes' median). A device must not claim more than it announced",
        update.round,
        update.node,
        update.num_examples,
        limit,
        registry.announced_examples(update.node),
        factor,
    )
    return dataclasses.replace(update, num_examples=limit, claimed_examples=update.num_examples)


def round_update_metrics(updates: list[ClientUpdate]) -> dict[str, Any]:
    """The round record's fields drawn from the accepted updates' metrics.

    A metric that an update did not report is left out, not counted as 0: `train_loss` is the weighted mean
    over the updates that reported it, and None (like `client_peak_memory_mb`) when none did.
    """
    reported = [u for u in updates if "train_loss" in u.metrics]
    weight = sum(u.num_examples for u in reported)
    train_loss = sum(u.metrics["train_loss"] * u.num_examples for u in reported) / weight if weight else None
    peaks = [u.metrics["peak_memory_mb"] for u in updates if "peak_memory_mb" in u.metrics]
    return {
        "train_loss": train_loss,
        "client_peak_memory_mb": max(peaks) if peaks else None,
        "weights_capped": tuple(sorted(u.node for u in updates if u.claimed_examples is not None)),
    }
