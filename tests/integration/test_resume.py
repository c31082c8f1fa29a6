"""The coordinator resumes from its last checkpoint; clients resume from their persisted state."""

from __future__ import annotations

import json

import pytest

from coordinator.main import build_coordinator
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def run_federation(tmp_path, mosquitto, model_dir, data_dirs, test_folder, rounds):
    config = coordinator_config(tmp_path, model_dir, mosquitto.url, test_folder, clients=2, rounds=rounds)
    coordinator = build_coordinator(config)
    coordinator.start()  # connected (and stale retained state cleared) before the clients join
    agents, threads = start_agents(client_configs(tmp_path, model_dir, mosquitto.url, data_dirs))
    try:
        return coordinator.run(), agents
    finally:
        for t in threads:
            t.join(30)


def test_a_second_coordinator_continues_after_the_last_completed_round(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=150)
    first, _ = run_federation(tmp_path, mosquitto, tiny_model_dir, data_dirs, test_folder, rounds=1)
    state = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    assert state["round"] == 1 and (tmp_path / "ckpt" / state["adapter_dir"] / "adapter_model.safetensors").is_file()

    second, agents = run_federation(tmp_path, mosquitto, tiny_model_dir, data_dirs, test_folder, rounds=2)
    assert [r["round"] for r in second["rounds"]] == [1, 2]
    assert second["rounds"][0] == first["rounds"][0]  # round 1 came from the checkpoint, not a rerun
    assert second["initial_accuracy"] == first["initial_accuracy"]
    # Each client trained only round 2 this time: its persisted state said round 1 was done.
    assert [a.rounds_trained for a in agents] == [1, 1]
