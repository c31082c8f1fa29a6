"""kill -9 the coordinator mid-round, run the same command again: no completed round and no update lost."""

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
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_coordinator(config_path, log_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        argv = [sys.executable, "-m", "flora.app", "coordinator", "--config", str(config_path)]
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


def test_kill_9_mid_round_then_resume(tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=3, per_client=120)
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=3, rounds=3, local_epochs=1
    )
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(to_toml(config))
    log_path = tmp_path / "coordinator.log"

    topics = Topics(config.run_id)
    observer = MqttTransport(mosquitto.url, "observer")
    observer.connect()
    observer.subscribe(topics.instruction)
    first = start_coordinator(config_path, log_path)
    agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs), max_seconds=240)
    second = None
    try:
        # Kill the coordinator the moment round 2 is handed out (round 1 is checkpointed by then).
        def round_two_published():
            message = observer.receive(timeout=0.1)
            return bool(message and message.payload and envelope_from_bytes(message.payload).round == 2)

        wait_for(round_two_published, 120, "the round-2 instruction")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # The clients finish round 2 and publish while no coordinator is connected: the broker queues them.
        wait_for(lambda: all(a.state.last_round_trained == 2 for a in agents), 60, "clients to send round 2")
        assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["round"] == 1

        second = start_coordinator(config_path, log_path)  # the very same command
        assert second.wait(180) == 0, log_path.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
        observer.close()
        for t in threads:
            t.join(30)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert [r["participants"] for r in report["rounds"]] == [3, 3, 3]
    # Never trained twice: each client trained rounds 1, 2 and 3 exactly once across the crash.
    assert [a.rounds_trained for a in agents] == [3, 3, 3]
    log = log_path.read_text()
    assert "resumed run itest after round 1" in log and "resuming round 2 with its original selection" in log
    # The broker's queue (persistent session, QoS 1) delivered the round-2 updates sent while we were dead;
    # the clients' re-sends of the same updates came second and were counted as re-sends, not rejections.
    # Were the queue lost, the re-sends would have been accepted and nothing counted.
    assert sum(r["resent"] for r in report["rounds"]) == 3
    assert report["rejections"] == {}
