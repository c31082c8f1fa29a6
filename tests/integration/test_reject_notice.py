"""A client whose update is refused is told why and dropped from the round at once (issue 11, item 3)."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest

from coordinator.events import UpdatesCollected
from coordinator.main import build_coordinator
from edge_client.main import build_agent
from tests.integration.helpers import client_configs, coordinator_config, stage_clients

pytestmark = pytest.mark.integration


def test_a_rank_mismatched_client_is_told_and_does_not_hold_the_round_open(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=60)
    # FedAvg takes only the run's rank; the deadline is far longer than the round takes.
    config = coordinator_config(
        tmp_path,
        tiny_model_dir,
        mosquitto.url,
        test_folder,
        clients=2,
        rounds=1,
        local_epochs=1,
        quorum=1,
        round_deadline_s=600.0,
    )
    collected = []
    coordinator = build_coordinator(
        config, subscribers=[lambda e: collected.append(e) if isinstance(e, UpdatesCollected) else None]
    )
    coordinator.start()
    full, weak = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    # The weak device does not announce its rank (a protocol 1.1 client), so the coordinator cannot tell it apart
    # before its update arrives: its update is what is refused.
    agents = [build_agent(c, progress=False) for c in (full, dataclasses.replace(weak, lora_rank=4))]
    agents[1].rank = None
    threads = [threading.Thread(target=a.run, kwargs={"max_seconds": 120}, daemon=True) for a in agents]
    with caplog.at_level(logging.ERROR, logger="edge_client.agent"):
        for t in threads:
            t.start()
        try:
            report = coordinator.run()
        finally:
            for t in threads:
                t.join(60)
    (record,) = report["rounds"]
    assert record["participants"] == 1 and record["accepted"] == ["client-0"]
    assert record["rejected"] == {"tensor_shape_mismatch": 1}
    # Closed because everyone selected had answered or been refused, not by the deadline.
    assert record["seconds"] < config.round_deadline_s
    assert [(e.accepted, e.rejected) for e in collected] == [(1, 1)]
    # The device heard why, with the fix naming the rank (not the recipe, which is the same on both sides).
    told = [r.getMessage() for r in caplog.records if "refused this device's update" in r.getMessage()]
    assert len(told) == 1, [r.getMessage() for r in caplog.records]
    assert "LoRA rank 4, the run's rank is 8" in told[0] and "set lora_rank = 8" in told[0]
    assert "svd_lora" in told[0] and "set recipe" not in told[0]
