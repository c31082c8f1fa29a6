"""The FedAvg weight cap and the round's metrics weighted by it (coordinator/weighting.py)."""

import numpy as np

from coordinator.registry import Registry
from coordinator.weighting import cap_weight, round_update_metrics, weight_limit
from flora.algorithms import ClientUpdate


def registry_of(**sizes):
    registry = Registry()
    for node, size in sizes.items():
        caps = {} if size is None else {"dataset_size": size}
        registry.update(node, {"state": "online", "recipe": "paper", "capabilities": caps})
    return registry


def claim(node, count, **metrics):
    return ClientUpdate(node, 1, {"x": np.zeros(2, np.float32)}, count, metrics)


def test_an_honest_count_is_kept_exactly():
    registry = registry_of(a=100, b=300, c=5000)  # c holds 50x the median... and announced it
    for node, size in (("a", 100), ("b", 300)):
        assert cap_weight(claim(node, size), registry, "abc", 10.0).num_examples == size


def test_a_count_above_the_announced_size_is_capped_at_it(caplog):
    registry = registry_of(a=100, b=100, liar=100)
    capped = cap_weight(claim("liar", 10**9), registry, ["a", "b", "liar"], 10.0)
    assert (capped.num_examples, capped.claimed_examples) == (100, 10**9)
    assert "liar claims 1000000000 examples" in caplog.text and "capped at 100" in caplog.text


def test_a_device_lying_in_its_status_too_gets_at_most_factor_times_the_median():
    registry = registry_of(a=100, b=120, liar=10**9, idle=10**6)  # idle is not selected: not in the median
    assert weight_limit(registry, "liar", ["a", "b", "liar"], 10.0) == 1200
    assert weight_limit(registry, "liar", ["a", "b", "liar"], None) is None  # the cap turned off


def test_a_device_that_announced_nothing_is_capped_by_the_median_of_the_others():
    registry = registry_of(a=100, b=100, quiet=None)
    assert weight_limit(registry, "quiet", ["a", "b", "quiet"], 4.0) == 400
    assert weight_limit(registry_of(x=None), "x", ["x"], 4.0) is None  # nobody announced: nothing to cap with


def test_round_metrics_skip_updates_that_did_not_report_them():
    updates = [claim("a", 100, train_loss=1.0, peak_memory_mb=50.0), claim("b", 300), claim("c", 100, train_loss=3.0)]
    metrics = round_update_metrics(updates)
    assert metrics["train_loss"] == 2.0  # over a and c only, not (100*1 + 300*0 + 100*3) / 500
    assert metrics["client_peak_memory_mb"] == 50.0
    assert round_update_metrics([claim("b", 300)]) == {
        "train_loss": None,
        "client_peak_memory_mb": None,
        "weights_capped": (),
    }
