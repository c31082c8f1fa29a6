"""In-memory twin of an MQTT broker and client, for unit tests of roles without a network.

It keeps the semantics the roles rely on: topic wildcards, retained messages, Last Will on an
abnormal disconnect (`drop()`), and a per-client inbox. Integration tests use a real broker.
"""

from __future__ import annotations

import queue
import threading
from typing import ClassVar

from paho.mqtt.client import topic_matches_sub

from flora.transport.base import Message, Transport, TransportError


class MemoryBroker:
    _named: ClassVar[dict[str, MemoryBroker]] = {}

    def __init__(self, max_message_bytes: int | None = None):
        self._lock = threading.Lock()
        self._clients: dict[str, MemoryTransport] = {}
        self._retained: dict[str, Message] = {}
        self.max_message_bytes = max_message_bytes

    @classmethod
    def named(cls, name: str) -> MemoryBroker:
        return cls._named.setdefault(name, cls())

    def attach(self, client: MemoryTransport) -> None:
        with self._lock:
            self._clients[client.client_id] = client

    def detach(self, client: MemoryTransport, *, abnormal: bool) -> None:
        with self._lock:
            self._clients.pop(client.client_id, None)
        if abnormal and client.will is not None:
            self.route(client.will)

    def subscribed(self, client: MemoryTransport, topic_filter: str) -> None:
        with self._lock:
            retained = [m for t, m in self._retained.items() if topic_matches_sub(topic_filter, t)]
        for message in retained:
            client.deliver(message)

    def route(self, message: Message) -> None:
        if self.max_message_bytes is not None and len(message.payload) > self.max_message_bytes:
            raise TransportError(f"message of {len(message.payload)} bytes exceeds broker limit")
        with self._lock:
            if message.retain:
                if message.payload:
                    self._retained[message.topic] = message
                else:  # an empty retained payload clears the topic, as in MQTT
                    self._retained.pop(message.topic, None)
            targets = [c for c in self._clients.values() if c.matches(message.topic)]
        # As an MQTT broker does: the retain flag is set only on the stored copy sent to a new subscription.
        live = Message(message.topic, message.payload, message.qos, retain=False) if message.retain else message
        for client in targets:
            client.deliver(live)


class MemoryTransport(Transport):
    def __init__(self, broker: MemoryBroker, client_id: str):
        self.broker = broker
        self.client_id = client_id
        self.will: Message | None = None
        self._filters: list[str] = []
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._connected = False

    def connect(self, *, will: Message | None = None, timeout: float = 30.0) -> None:
        self.will = will
        self.broker.attach(self)
        self._connected = True

    def matches(self, topic: str) -> bool:
        return any(topic_matches_sub(f, topic) for f in self._filters)

    def deliver(self, message: Message) -> None:
        self.bytes_received += len(message.payload)
        self._inbox.put(message)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self._filters.append(topic_filter)
        self.broker.subscribed(self, topic_filter)

    def publish(self, message: Message, *, timeout: float | None = None) -> None:
        if not self._connected:
            raise TransportError("not connected")
        self.bytes_sent += len(message.payload)
        self.broker.route(message)

    def receive(self, timeout: float | None = None) -> Message | None:
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        if self._connected:
            self._connected = False
            self.broker.detach(self, abnormal=False)

    def drop(self) -> None:
        """Vanish without a clean disconnect: the broker publishes our Last Will."""
        if self._connected:
            self._connected = False
            self.broker.detach(self, abnormal=True)

    @property
    def connected(self) -> bool:
        return self._connected
