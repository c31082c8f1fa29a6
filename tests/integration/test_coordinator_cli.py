"""`flora coordinator --config` end to end as a process, with the optional export when finished."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flora.config import to_toml
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def test_coordinator_command_runs_the_rounds_and_exports_when_finished(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=80)
    config = coordinator_config(
        tmp_path,
        tiny_model_dir,
        mosquitto.url,
        test_folder,
        clients=2,
        rounds=1,
        local_epochs=1,
        export_dir=tmp_path / "onnx",
    )
    path = tmp_path / "coordinator.toml"
    path.write_text(to_toml(config))
    with open(tmp_path / "coordinator.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flora.app", "coordinator", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs))
    try:
        assert proc.wait(240) == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        for t in threads:
            t.join(30)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rounds"][0]["participants"] == 2
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    assert "exported" in (tmp_path / "coordinator.log").read_text()
