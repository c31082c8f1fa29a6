"""Flow control of the MQTT transport against a real Mosquitto: a burst waits in the broker, not in our memory.

MqttTransport stops reading its socket while its inbox holds more than `max_inbox_bytes`; QoS 1 messages are
acknowledged only when taken. These tests show the bound holds under a burst of concurrent publishers, that
nothing is lost, that the node can still publish while its inbox is full, and that a full inbox left alone for
several keepalive periods does not cost the connection.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from flora.transport.base import RECONNECTED, Message
from flora.transport.mqtt import MqttTransport
from tests.brokers import mosquitto_broker

pytestmark = pytest.mark.integration

PAYLOAD = 100_000  # about one paper-recipe update
BOUND = 2 * PAYLOAD
PUBLISHERS = 40


def _subscriber(url: str, **kwargs) -> MqttTransport:
    subscriber = MqttTransport(url, "coordinator-like", clean_session=False, max_inbox_bytes=BOUND, **kwargs)
    subscriber.connect()
    subscriber.subscribe("burst/#", 1)
    return subscriber


def _burst(url: str, count: int = PUBLISHERS) -> list[MqttTransport]:
    """`count` clients each publish one 100 KB QoS 1 message at the same moment."""
    publishers = [MqttTransport(url, f"node-{i}") for i in range(count)]
    for publisher in publishers:
        publisher.connect()
    threads = [
        threading.Thread(target=p.publish, args=(Message(f"burst/{i}", os.urandom(PAYLOAD), qos=1),))
        for i, p in enumerate(publishers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return publishers


def _within(seconds: float, condition) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _drain(transport: MqttTransport, expected: int) -> list[Message]:
    received = []
    while len(received) < expected:
        message = transport.receive(timeout=10)
        if message is None:
            break
        received.append(message)
    return received


def test_a_burst_waits_in_the_broker_and_nothing_is_lost(mosquitto):
    subscriber = _subscriber(mosquitto.url)
    publishers = _burst(mosquitto.url)
    try:
        # Every publisher has its PUBACK (_burst joined them): all 40 messages are in the broker's hands.
        # Wait until reading pauses; without the bound the broker's in-flight window alone (Mosquitto: 20) would be
        # here, 2 MB.
        assert _within(10, lambda: subscriber.inbox_bytes >= BOUND), "the inbox never filled up to the bound"
        held = subscriber.inbox_bytes
        assert held <= BOUND + 2 * PAYLOAD, f"inbox holds {held} bytes, bound {BOUND}"
        received = _drain(subscriber, PUBLISHERS)
        assert sorted(m.topic for m in received) == sorted(f"burst/{i}" for i in range(PUBLISHERS))
        assert all(len(m.payload) == PAYLOAD for m in received)
        assert subscriber.inbox_bytes == 0
    finally:
        for transport in [subscriber, *publishers]:
            transport.close()


def test_publishing_while_the_inbox_is_full_does_not_deadlock(mosquitto):
    subscriber = _subscriber(mosquitto.url)
    publishers = _burst(mosquitto.url, count=10)
    try:
        assert _within(10, lambda: subscriber.inbox_bytes >= BOUND)  # reading is paused now
        # Our PUBACK is behind the paused messages; publish() must still see it, within its timeout.
        subscriber.publish(Message("elsewhere/result", b"x" * 1000, qos=1), timeout=10)
        assert len(_drain(subscriber, 10)) == 10
    finally:
        for transport in [subscriber, *publishers]:
            transport.close()


def test_a_full_inbox_left_alone_keeps_the_connection_and_its_bound(mosquitto):
    # keepalive 1 s: paho pings every second and drops the link if a PINGRESP is not read within 1 s;
    # the PINGRESP is behind the paused messages, and reading up to it must not empty them into the inbox.
    subscriber = _subscriber(mosquitto.url, keepalive=1)
    publishers = _burst(mosquitto.url, count=20)
    try:
        peak = 0
        for _ in range(40):  # four keepalive periods while the inbox is full and nobody consumes
            time.sleep(0.1)
            peak = max(peak, subscriber.inbox_bytes)
        assert peak <= BOUND + 2 * PAYLOAD, f"inbox reached {peak} bytes, bound {BOUND}"
        assert subscriber.connected
        received = _drain(subscriber, 20)
        assert RECONNECTED not in [m.topic for m in received], "the connection dropped while the inbox was full"
        assert sorted(m.topic for m in received) == sorted(f"burst/{i}" for i in range(20))
    finally:
        for transport in [subscriber, *publishers]:
            transport.close()


def test_a_full_inbox_does_not_stop_a_reconnect():
    with mosquitto_broker(persistence=True) as broker:
        subscriber = _subscriber(broker.url, keepalive=2)
        publishers = _burst(broker.url, count=10)
        try:
            assert _within(10, lambda: subscriber.inbox_bytes >= BOUND)  # reading is paused
            broker.restart()
            # The role is busy elsewhere and takes nothing from the inbox. The drop must be noticed all the
            # same (a paused plain socket is peeked for end-of-file), and the CONNACK read.
            assert _within(10, lambda: not subscriber.connected), "the broker's restart went unnoticed"
            assert _within(15, lambda: subscriber.connected), "reconnect stalled behind the paused inbox"
            subscriber.publish(Message("elsewhere/result", b"r", qos=1), timeout=10)
        finally:
            for transport in [subscriber, *publishers]:
                transport.close()
