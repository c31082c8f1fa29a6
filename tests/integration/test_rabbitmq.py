"""A federation on RabbitMQ's MQTT plugin, which delivers no retained message to a wildcard subscription.

The coordinator finds clients that announced before it started (they answer its presence request), in either
start order, and `flora status --run-id` sees them. One RabbitMQ for the module: it takes ~15 s to start.
"""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.main import build_coordinator
from flora.app.status import collect
from flora.protocol import Topics, envelope_from_bytes
from flora.transport.mqtt import MqttTransport
from tests.brokers import RabbitMqBroker
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory):
    with RabbitMqBroker(log_path=tmp_path_factory.mktemp("rabbitmq") / "rabbitmq.log") as broker:
        yield broker


def _wait_until_online(url: str, run_id: str, nodes: list[str]) -> None:
    """Each node's retained status, read the way RabbitMQ does deliver it: on an exact-topic subscription."""
    watcher = MqttTransport(url, f"watch-{run_id}")
    watcher.connect()
    try:
        for node in nodes:
            topic = Topics(run_id).status(node)
            watcher.subscribe(topic)
            while True:
                message = watcher.receive(timeout=60)
                assert message is not None, f"{node} never announced itself"
                if message.topic == topic and envelope_from_bytes(message.payload).data.get("state") == "online":
                    break
    finally:
        watcher.close()


def test_clients_started_before_and_after_the_coordinator_are_found(
    rabbitmq, tmp_path, tiny_model_dir, digits, digits_split, test_folder
):
    # Both start orders in one run: two clients announce before the coordinator exists, one after it started.
    run_id = "rabbit-run"
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=3, per_client=100)
    url = rabbitmq.url
    config = coordinator_config(
        tmp_path, tiny_model_dir, url, test_folder, clients=3, rounds=1, local_epochs=1, run_id=run_id,
        wait_for_clients_s=60.0,
    )  # fmt: skip
    # No periodic status during the test: the coordinator must find the early clients by asking, not by
    # waiting for a heartbeat that a wildcard subscription does receive.
    configs = [
        dataclasses.replace(c, status_interval_s=3600.0)
        for c in client_configs(tmp_path, tiny_model_dir, url, data_dirs, run_id=run_id)
    ]
    early, early_threads = start_agents(configs[:2])
    _wait_until_online(url, run_id, ["client-0", "client-1"])
    nodes, _, _ = collect(url, run_id=run_id, wait=0)  # `flora status --run-id`, before the coordinator
    assert {node for (_, node), data in nodes.items() if data.get("state") == "online"} == {"client-0", "client-1"}

    coordinator = build_coordinator(config)
    coordinator.start()
    late, late_threads = start_agents(configs[2:])
    try:
        report = coordinator.run()
    finally:
        for t in early_threads + late_threads:
            t.join(60)
    assert report["rounds"][0]["participants"] == 3
    assert [a.rounds_trained for a in early + late] == [1, 1, 1]
