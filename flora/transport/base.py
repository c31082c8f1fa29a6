"""The Transport interface every role talks through.

Deliberately small: connect (with an optional Last Will), subscribe, publish, receive, close.
Incoming messages queue up and are taken with `receive`, so a role's main thread does the
work (training takes minutes) while the network thread only keeps the connection alive.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from flora.errors import FloraError


class TransportError(FloraError):
    """The broker could not be reached, refused us, or a message cannot be sent as it is."""


# Posted to a transport's inbox (never sent on the wire) after a *re*-connection, so the role's own
# thread can re-announce itself: a broker restart may have published our Will ("offline") meanwhile.
RECONNECTED = "$flora/reconnected"


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class Transport(abc.ABC):
    bytes_sent: int = 0
    bytes_received: int = 0

    @abc.abstractmethod
    def connect(self, *, will: Message | None = None, timeout: float = 30.0) -> None:
        """Connect (retrying with backoff until `timeout`); `will` is published if we vanish."""

    @abc.abstractmethod
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Receive messages matching `topic_filter` (MQTT wildcards); kept across reconnects."""

    @abc.abstractmethod
    def publish(self, message: Message, *, timeout: float | None = None) -> None:
        """Send; for QoS 1 returns once the broker acknowledged. Waits through an outage of any length (logging
        its progress) unless `timeout` is given, after which it raises TransportError."""

    @abc.abstractmethod
    def receive(self, timeout: float | None = None) -> Message | None:
        """The next incoming message, or None after `timeout` seconds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (the Last Will is not sent)."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the connection to the broker is up."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def redact_url(url: str) -> str:
    """The broker URL as it may be shown in logs, errors and titles: a password in it becomes ***."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"
