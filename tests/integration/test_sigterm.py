"""SIGTERM (kill, docker stop, Kubernetes) stops both roles as gracefully as Ctrl-C: each publishes its own offline
status, the saved state is intact, and the exit code says SIGTERM (143), not a death by signal (issue 11, item 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flora.config import to_toml
from flora.protocol import Topics, envelope_from_bytes
from flora.transport.mqtt import MqttTransport
from tests.integration.helpers import client_configs, coordinator_config, stage_clients

pytestmark = pytest.mark.integration


def _start(role, config_path, log_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:
        argv = [sys.executable, "-m", "flora.app", role, "--config", str(config_path)]
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def _retained_statuses(url, topics, nodes):
    observer = MqttTransport(url, "status-reader")
    observer.connect()
    observer.subscribe(topics.all_status)
    seen = {}
    end = time.monotonic() + 10
    while set(seen) != set(nodes) and time.monotonic() < end:
        message = observer.receive(timeout=0.5)
        if message is not None and message.payload:
            env = envelope_from_bytes(message.payload)
            seen[env.sender] = env.data
    observer.close()
    return seen


def test_sigterm_stops_coordinator_and_client_gracefully(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    (data_dir,) = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=60)
    config = coordinator_config(
        tmp_path,
        tiny_model_dir,
        mosquitto.url,
        test_folder,
        clients=1,
        rounds=3,
        local_epochs=1,
        round_deadline_s=600.0,
    )
    (client,) = client_configs(tmp_path, tiny_model_dir, mosquitto.url, [data_dir])
    (tmp_path / "coordinator.toml").write_text(to_toml(config))
    (tmp_path / "client.toml").write_text(to_toml(client))
    topics = Topics(config.run_id)
    observer = MqttTransport(mosquitto.url, "observer")
    observer.connect()
    observer.subscribe(topics.metrics)
    coordinator = _start("coordinator", tmp_path / "coordinator.toml", tmp_path / "coordinator.log")
    device = _start("client", tmp_path / "client.toml", tmp_path / "client.log")
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end:  # round 1's result: both have state on disk, round 2 is under way
            message = observer.receive(timeout=0.5)
            if message is not None and message.payload and envelope_from_bytes(message.payload).round == 1:
                break
        else:
            raise AssertionError("no round 1 result:\n" + (tmp_path / "coordinator.log").read_text()[-3000:])
        coordinator.send_signal(signal.SIGTERM)
        device.send_signal(signal.SIGTERM)
        assert coordinator.wait(60) == 128 + signal.SIGTERM, (tmp_path / "coordinator.log").read_text()[-3000:]
        assert device.wait(60) == 128 + signal.SIGTERM, (tmp_path / "client.log").read_text()[-3000:]
    finally:
        observer.close()
        for proc in (coordinator, device):
            if proc.poll() is None:
                proc.kill()

    saved = json.loads((tmp_path / "ckpt" / "state.json").read_text())
    progress = json.loads((client.state_dir / "state.json").read_text())
    assert saved["round"] >= 1 and progress["last_round_trained"] >= 1
    # Each one's own offline status, not its Last Will: the Will was registered at connect, when the coordinator
    # had completed round 0 and the client had trained nothing (-1).
    statuses = _retained_statuses(mosquitto.url, topics, [config.node_id, client.node_id])
    assert statuses[config.node_id] == {"state": "offline", "role": "coordinator", "round": saved["round"]}
    assert statuses[client.node_id]["state"] == "offline"
    assert statuses[client.node_id]["last_round_trained"] == progress["last_round_trained"]
    for log in ("coordinator.log", "client.log"):
        assert "stopped by SIGTERM" in (tmp_path / log).read_text()
