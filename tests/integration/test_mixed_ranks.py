"""A weak device trains at a lower LoRA rank than the fleet; svd_lora aggregates it exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from coordinator.main import build_coordinator
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def test_a_rank_4_client_joins_a_rank_8_svd_lora_run(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=100)
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=2, rounds=2, local_epochs=1, strategy="svd_lora"
    )
    coordinator = build_coordinator(config)
    coordinator.start()
    full, weak = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    agents, threads = start_agents([full, dataclasses.replace(weak, lora_rank=4)])
    try:
        report = coordinator.run()
    finally:
        for t in threads:
            t.join(60)
    assert [r["participants"] for r in report["rounds"]] == [2, 2]
    assert report["rejections"] == {}
    weak_state = agents[1].trainer.adapter_state()
    assert {v.shape[0] for k, v in weak_state.items() if "lora_A" in k} == {4}  # it really trained at rank 4
    assert {v.shape[0] for k, v in coordinator.global_tensors.items() if "lora_A" in k} == {8}
    assert all(np.isfinite(v).all() for v in coordinator.global_tensors.values())
