"""The broker restarts mid-run: coordinator and clients reconnect by themselves and the run completes."""

from __future__ import annotations

import threading
import time

import pytest

from coordinator.main import build_coordinator
from flora.protocol import Topics, envelope_from_bytes
from flora.transport.mqtt import MqttTransport
from tests.brokers import mosquitto_broker
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def test_run_survives_a_broker_restart(tmp_path, tiny_model_dir, digits, digits_split, test_folder):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=3, per_client=100)
    with mosquitto_broker(persistence=True) as broker:
        config = coordinator_config(
            tmp_path, tiny_model_dir, broker.url, test_folder, clients=3, rounds=3, local_epochs=1
        )
        coordinator = build_coordinator(config)
        coordinator.start()
        observer = MqttTransport(broker.url, "observer", clean_session=False)
        observer.connect()
        observer.subscribe(Topics(config.run_id).metrics)
        restarted = threading.Event()

        def restart_after_round_one():
            end = time.monotonic() + 120
            while time.monotonic() < end:
                message = observer.receive(timeout=0.2)
                if message and message.payload and envelope_from_bytes(message.payload).round == 1:
                    broker.restart()
                    restarted.set()
                    return

        threading.Thread(target=restart_after_round_one, daemon=True).start()
        agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, broker.url, data_dirs))
        try:
            report = coordinator.run()
        finally:
            observer.close()
            for t in threads:
                t.join(60)
    assert restarted.is_set()
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["participants"] == 3 for r in report["rounds"])
    assert [a.rounds_trained for a in agents] == [3, 3, 3]
