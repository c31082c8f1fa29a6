"""A Transport that splits messages over the broker's size limit and reassembles incoming chunks.

Roles keep publishing and receiving whole envelopes; this wrapper does the rest (the wire format is
flora/protocol/chunking.py, the topic layout flora/protocol/topics.py, both in docs/PROTOCOL.md §2.1):

- publish: a message whose MQTT packet fits `max_message_bytes` (None: no limit) goes out unchanged;
  a larger one goes out as chunks. A retained message also clears the chunk slots that an earlier,
  longer retained message on the same topic left behind (those this process knows of).
- subscribe: every filter is doubled with `{filter}/chunk/+` so the chunk slots arrive too.
- receive: chunks are reassembled within ChunkLimits (per sender and in total, see
  flora/protocol/reassembly.py) and the whole message is returned on its own topic, once verified.
  A chunk that is refused is dropped and counted, and logged at most once per interval (a flood of
  refused chunks must not flood the log), except for a protocol-version
  mismatch, which is handed to the role unchanged so that the role reports it (it is the operator's
  problem to fix, not noise).

Every node reassembles, whatever its own limit: a peer may have a smaller one.
"""

from __future__ import annotations

import logging
import time

from flora.errors import ProtocolError, RejectReason
from flora.protocol.chunking import ChunkLimits, Reassembler, is_chunk, mqtt_publish_packet_size, split_message
from flora.protocol.topics import chunk_filter, chunk_topic, split_chunk_topic
from flora.throttled_log import ThrottledLog
from flora.transport.base import Message, Transport, TransportError

log = logging.getLogger(__name__)
drops = ThrottledLog(__name__)

IDLE_WAKEUP_S = 1.0  # a blocking receive still wakes this often to expire idle transfers


class ChunkingTransport(Transport):
    def __init__(
        self,
        inner: Transport,
        max_message_bytes: int | None,
        *,
        limits: ChunkLimits | None = None,
        reassembler: Reassembler | None = None,
    ):
        self.inner = inner
        self.max_message_bytes = max_message_bytes
        self.reassembler = reassembler or Reassembler(limits)
        self._retained_slots: dict[str, int] = {}  # topic -> chunk slots our last retained message used

    # -- sending --------------------------------------------------------------------------------
    def connect(self, *, will: Message | None = None, timeout: float = 30.0) -> None:
        if will is not None and self._too_big(will):
            raise TransportError(
                f"the Last Will on {will.topic} is {len(will.payload)} bytes, over max_message_bytes "
                f"{self.max_message_bytes}; a Will cannot be chunked, keep it small"
            )
        self.inner.connect(will=will, timeout=timeout)

    def publish(self, message: Message, *, timeout: float | None = None) -> None:
        if not self._too_big(message):
            self.inner.publish(message, timeout=timeout)
            used_slots = 0
        else:
            try:
                pieces = split_message(
                    message.topic, message.payload, self.max_message_bytes, message.qos, self.reassembler.limits
                )
            except ProtocolError as exc:
                raise TransportError(
                    f"message on {message.topic} is {len(message.payload)} bytes, over max_message_bytes "
                    f"{self.max_message_bytes}, and cannot be chunked: {exc.detail}"
                ) from None
            for topic, payload in pieces:
                self.inner.publish(Message(topic, payload, message.qos, message.retain), timeout=timeout)
            used_slots = len(pieces) - 1
            log.debug("sent %d bytes on %s as %d chunks", len(message.payload), message.topic, len(pieces))
        if message.retain:
            self._clear_stale_slots(message.topic, used_slots, timeout)

    def _too_big(self, message: Message) -> bool:
        if self.max_message_bytes is None:
            return False
        return mqtt_publish_packet_size(message.topic, len(message.payload), message.qos) > self.max_message_bytes

    def _clear_stale_slots(self, topic: str, used: int, timeout: float | None) -> None:
        # A late subscriber would otherwise receive the old message's chunks. They could never complete
        # (their last chunk on `topic` was replaced), but they would sit in its buffer until they expire.
        for index in range(used, self._retained_slots.get(topic, 0)):
            self.inner.publish(Message(chunk_topic(topic, index), b"", 1, retain=True), timeout=timeout)
        self._retained_slots[topic] = used

    # -- receiving ------------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos)
        slots = chunk_filter(topic_filter)
        if slots is not None:
            self.inner.subscribe(slots, qos)

    def receive(self, timeout: float | None = None) -> Message | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.reassembler.expire_due()
            wait = IDLE_WAKEUP_S if deadline is None else max(0.0, deadline - time.monotonic())
            message = self.inner.receive(timeout=wait)
            if message is not None:
                whole = self._take(message)
                if whole is not None:
                    return whole
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _take(self, message: Message) -> Message | None:
        """The message a role should see for this incoming one, or None while a transfer is incomplete."""
        slot_of = split_chunk_topic(message.topic)
        if slot_of is None:
            if not is_chunk(message.payload):
                return message  # a whole message (or garbage, which the role rejects and counts)
            topic, slot = message.topic, None
        else:
            topic, slot = slot_of
            if not message.payload:
                return None  # a cleared chunk slot
        try:
            whole = self.reassembler.add(topic, message.payload, slot=slot, retain=message.retain)
        except ProtocolError as exc:
            if exc.reason is RejectReason.VERSION:
                return Message(topic, message.payload, message.qos, message.retain)
            drops.warning("chunk", "dropped a chunk on %s: %s", message.topic, exc)
            return None
        if whole is None:
            return None
        return Message(topic, whole.payload, message.qos, whole.retain)

    # -- the rest is the inner transport's -------------------------------------------------------
    def close(self) -> None:
        self.inner.close()

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received
