"""MQTT 5 against a real Mosquitto: Receive Maximum bounds in-flight deliveries without pausing the socket, the
session persists across reconnects as 3.1.1's clean_session=False does, and 3.1.1 keeps its socket-pause bound."""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest

from flora.transport.base import Message
from flora.transport.mqtt import MqttTransport
from tests.brokers import mosquitto_broker

pytestmark = pytest.mark.integration

MESSAGES = 30
PAYLOAD = 10_000


def _publish_all(url: str, count: int = MESSAGES, payload: int = PAYLOAD) -> None:
    """`count` QoS 1 messages from concurrent publishers; returns once the broker acknowledged every one."""
    publishers = [MqttTransport(url, f"pub-{i}") for i in range(count)]
    for publisher in publishers:
        publisher.connect()
    threads = [
        threading.Thread(target=p.publish, args=(Message(f"burst/{i}", os.urandom(payload), qos=1),), daemon=True)
        for i, p in enumerate(publishers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for publisher in publishers:
        publisher.close()


def _settled_inbox(subscriber: MqttTransport) -> list[int]:
    """The inbox's message count, sampled until it has not grown for a while (the broker sent what it may)."""
    samples = [subscriber.inbox_messages]
    while len(samples) < 10 or samples[-1] != samples[-10]:
        time.sleep(0.1)
        samples.append(subscriber.inbox_messages)
        if len(samples) > 300:
            break
    return samples


def test_receive_maximum_bounds_unacknowledged_deliveries_under_mqtt5(mosquitto):
    # A huge inbox bound: the 3.1.1 socket pause would let all 30 in; only Receive Maximum can hold them back.
    subscriber = MqttTransport(
        mosquitto.url, "sub5", clean_session=False, mqtt_version="5", receive_maximum=2, max_inbox_bytes=10**9
    )
    subscriber.connect()
    subscriber.subscribe("burst/#")
    try:
        _publish_all(mosquitto.url)
        samples = _settled_inbox(subscriber)
        assert max(samples) == 2, f"in-flight deliveries {samples}: Receive Maximum 2 must bound them"
        received = []
        while len(received) < MESSAGES:
            message = subscriber.receive(timeout=10)
            assert message is not None, f"only {len(received)} of {MESSAGES} arrived"
            received.append(message.topic)
        assert sorted(received) == sorted(f"burst/{i}" for i in range(MESSAGES))
    finally:
        subscriber.close()


def test_without_receive_maximum_mqtt311_lets_the_broker_window_through(mosquitto):
    # The contrast the bound above is measured against: Mosquitto's own in-flight window (20) under 3.1.1.
    subscriber = MqttTransport(mosquitto.url, "sub311", clean_session=False, max_inbox_bytes=10**9)
    subscriber.connect()
    subscriber.subscribe("burst/#")
    try:
        _publish_all(mosquitto.url)
        assert max(_settled_inbox(subscriber)) > 2
    finally:
        subscriber.close()


def test_an_mqtt5_session_persists_across_a_reconnect():
    # clean_start=False alone ends the session at disconnect under MQTT 5; the session expiry interval keeps it.
    with mosquitto_broker(persistence=True) as broker:
        node = MqttTransport(broker.url, "node5", clean_session=False, mqtt_version="5")
        node.connect()
        node.subscribe("for/node5")
        node.close()  # away, as a rebooting device
        sender = MqttTransport(broker.url, "sender", mqtt_version="5")
        sender.connect()
        sender.publish(Message("for/node5", b"queued while away", qos=1))
        sender.close()
        back = MqttTransport(broker.url, "node5", clean_session=False, mqtt_version="5")
        back.connect()
        try:
            message = back.receive(timeout=10)
            assert message is not None and message.payload == b"queued while away"
        finally:
            back.close()


def test_a_federation_completes_over_mqtt5(tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder):
    from coordinator.main import build_coordinator
    from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=100)
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=2, rounds=2, local_epochs=1, mqtt_version="5"
    )
    coordinator = build_coordinator(config)
    configs = [
        dataclasses.replace(c, mqtt_version="5")
        for c in client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    ]
    agents, threads = start_agents(configs)
    try:
        report = coordinator.run()
    finally:
        for t in threads:
            t.join(60)
    assert coordinator.transport.inner.mqtt_version == "5"
    assert all(a.transport.inner.mqtt_version == "5" for a in agents)
    assert [r["participants"] for r in report["rounds"]] == [2, 2]
    assert [a.rounds_trained for a in agents] == [2, 2]
