"""Split a message that is over the broker's size limit into chunks, and put it back together safely.

Managed brokers cap a publish (AWS IoT Core: 128 KB) and an adapter can be megabytes. A message
larger than `max_message_bytes` is sent as n chunk envelopes (kind "chunk", each a normal FLRA
envelope whose body is one slice of the original payload and carries its own sha256):

    data = {"transfer": 32 hex, "index": i, "total": n, "total_size": bytes, "sha256": hex of the whole}

Chunk i < n - 1 goes to `{topic}/chunk/{i}`, the last one to `{topic}` (see flora/protocol/topics.py).
The receiver keeps at most `ChunkLimits` worth of partial transfers, drops a transfer that stays
idle for `idle_timeout_s`, and hands the payload on only when every chunk arrived and the size and
sha256 of the whole match. A lost, corrupted or inconsistent chunk therefore fails that one message
(the sender's update misses the round; a retained instruction is delivered again on reconnect):
it never yields a different payload.

Pure logic, no I/O: flora/transport/chunked.py applies it to a Transport.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from flora.errors import ProtocolError, RejectReason
from flora.protocol.envelope import Envelope, envelope_from_bytes, envelope_to_bytes, read_header
from flora.protocol.topics import chunk_topic

log = logging.getLogger(__name__)

# Default for both roles: under AWS IoT Core's 128 KB cap on a publish, with headroom for brokers that count
# the limit slightly differently. Mosquitto's max_packet_size counts the whole packet, as we do.
DEFAULT_MAX_MESSAGE_BYTES = 120_000
MIN_MAX_MESSAGE_BYTES = 4096  # leaves room for chunk headers (~500 bytes) and a useful slice of data
MIN_CHUNK_DATA = 1024  # below this the chunk headers would outweigh the data: the limit is misconfigured
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class ChunkLimits:
    """What a receiver is willing to buffer. Every bound is checked before the bytes are kept."""

    max_transfer_bytes: int = 64 * 1024 * 1024  # the largest message one transfer may declare
    max_chunks: int = 32_768  # chunks per transfer (64 MiB in ~2 KB chunks at the smallest sane limit)
    max_transfers: int = 256  # partial transfers at once (a coordinator receives one per client)
    max_buffered_bytes: int = 256 * 1024 * 1024  # all partial transfers together
    idle_timeout_s: float = 120.0  # a transfer with no new chunk for this long is dropped


def mqtt_publish_packet_size(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH packet on the wire: what a broker's max_packet_size counts."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + payload_len
    length_bytes = 1 if remaining < 128 else 2 if remaining < 16_384 else 3 if remaining < 2_097_152 else 4
    return 1 + length_bytes + remaining


# -- sending ----------------------------------------------------------------------------------------
def split_message(
    topic: str, payload: bytes, max_message_bytes: int, qos: int = 1, limits: ChunkLimits | None = None
) -> list[tuple[str, bytes]]:
    """(topic, chunk payload) pairs, in order, each an MQTT packet of at most `max_message_bytes`.

    The payload must be an FLRA envelope: its run, sender and round are copied into every chunk so a
    receiver can attribute (and drop) chunks before reassembly. Raises ProtocolError if it cannot be split
    or if receivers with `limits` (default: ChunkLimits()) would refuse the transfer.
    """
    limits = limits or ChunkLimits()
    header, _ = read_header(payload)
    if len(payload) > limits.max_transfer_bytes:
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"{len(payload)} bytes is over the {limits.max_transfer_bytes}-byte transfer limit receivers enforce",
        )
    round_ = header.get("round")
    round_ = round_ if isinstance(round_, int) and not isinstance(round_, bool) and round_ >= 0 else None
    transfer = uuid.uuid4().hex
    whole_sha = hashlib.sha256(payload).hexdigest()
    sent_at = time.time()

    def chunk(index: int, total: int, piece: bytes) -> bytes:
        env = Envelope(
            kind="chunk",
            run=header.get("run"),
            sender=header.get("sender"),
            round=round_,
            data={
                "transfer": transfer,
                "index": index,
                "total": total,
                "total_size": len(payload),
                "sha256": whole_sha,
            },
            body=piece,
            sent_at=sent_at,
        )
        return envelope_to_bytes(env)  # checks run and sender ids: a bad envelope cannot be split

    # Upper bound of one chunk's overhead: 9-digit index and total (no chunk count has more), a body
    # size with as many digits as the limit itself, and the longest chunk topic. No real chunk is larger.
    widest = 999_999_999
    envelope_overhead = len(chunk(widest, widest, b"x")) - 1 + len(str(max_message_bytes)) - 1
    packet_overhead = mqtt_publish_packet_size(chunk_topic(topic, widest), 0, qos) + 3  # length field may grow
    budget = max_message_bytes - packet_overhead - envelope_overhead
    if budget < MIN_CHUNK_DATA:
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"max_message_bytes {max_message_bytes} leaves {budget} bytes per chunk on {topic}; raise it to at "
            f"least {max_message_bytes - budget + MIN_CHUNK_DATA}",
        )
    total = max(1, math.ceil(len(payload) / budget))
    if total > limits.max_chunks:
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"{total} chunks is over the {limits.max_chunks} receivers accept; raise max_message_bytes",
        )
    out = []
    for index in range(total):
        piece = payload[index * budget : (index + 1) * budget]
        where = topic if index == total - 1 else chunk_topic(topic, index)
        data = chunk(index, total, piece)
        size = mqtt_publish_packet_size(where, len(data), qos)
        if size > max_message_bytes:  # the bound above is exact enough that this never happens; keep it honest
            raise ProtocolError(RejectReason.MALFORMED, f"chunk {index} is {size} bytes, over {max_message_bytes}")
        out.append((where, data))
    return out


def is_chunk(payload: bytes) -> bool:
    """True when the payload is an FLRA envelope of kind "chunk", of any version (False for anything else)."""
    try:
        header, _ = read_header(payload, check_version=False)
    except ProtocolError:
        return False
    return header.get("kind") == "chunk"


# -- receiving --------------------------------------------------------------------------------------
class Reassembled(NamedTuple):
    payload: bytes
    retain: bool  # the retain flag of the last chunk: whether the whole message came as a retained one


@dataclasses.dataclass
class _Transfer:
    total: int
    total_size: int
    sha256: str
    run: str
    sender: str
    last_seen: float
    pieces: dict[int, bytes] = dataclasses.field(default_factory=dict)
    received: int = 0  # bytes held in `pieces`
    retain: bool = False  # the retain flag of the last chunk: how the whole message was delivered

    def describe(self) -> str:
        return f"{len(self.pieces)}/{self.total} chunks ({self.received}/{self.total_size} bytes) from {self.sender}"


class Reassembler:
    """Collects chunks per (topic, transfer) within `ChunkLimits`; `add` returns a payload once complete.

    `stats` counts outcomes (completed, duplicate, expired, rejected_<reason>) for logs and tests.
    """

    def __init__(self, limits: ChunkLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or ChunkLimits()
        self.clock = clock
        self.stats: collections.Counter[str] = collections.Counter()
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        # Transfers delivered lately: their redelivered chunks (retained copy plus session queue) are
        # expected, so a partial duplicate that expires is not worth a warning.
        self._recent: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    @property
    def buffered_bytes(self) -> int:
        return sum(t.received for t in self._transfers.values())

    @property
    def pending(self) -> int:
        return len(self._transfers)

    def add(self, topic: str, payload: bytes, *, slot: int | None = None, retain: bool = False) -> Reassembled | None:
        """One chunk that arrived for `topic` (the base topic), from chunk slot `slot` (None: the topic itself).

        Returns the whole payload when this chunk completes a verified transfer, else None.
        Raises ProtocolError (and only that) for a chunk or a transfer it refuses.
        """
        try:
            return self._add(topic, payload, slot, retain)
        except ProtocolError as exc:
            self.stats[f"rejected_{exc.reason.value}"] += 1
            raise

    def _add(self, topic: str, payload: bytes, slot: int | None, retain: bool) -> Reassembled | None:
        self.expire()
        env = envelope_from_bytes(payload)  # framing, version, and this chunk's own sha256
        if env.kind != "chunk":
            raise ProtocolError(RejectReason.MALFORMED, f"expected a chunk, got {env.kind!r}")
        transfer_id, index, total, total_size, sha = _chunk_fields(env.data, self.limits)
        if (slot is None and index != total - 1) or (slot is not None and slot != index):
            where = "the message topic" if slot is None else f"chunk slot {slot}"
            raise ProtocolError(RejectReason.MALFORMED, f"chunk {index}/{total} arrived on {where}")
        key = (topic, transfer_id)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = self._start(key, total, total_size, sha, env)
        elif (transfer.total, transfer.total_size, transfer.sha256, transfer.run, transfer.sender) != (
            total,
            total_size,
            sha,
            env.run,
            env.sender,
        ):
            self._drop(key)
            raise ProtocolError(
                RejectReason.MALFORMED, f"chunk {index} of transfer {transfer_id} contradicts the others"
            )
        if index in transfer.pieces:
            if transfer.pieces[index] != env.body:
                self._drop(key)
                raise ProtocolError(RejectReason.MALFORMED, f"two different chunks {index} in transfer {transfer_id}")
            self.stats["duplicate"] += 1
            return None
        if transfer.received + len(env.body) > transfer.total_size:
            self._drop(key)
            raise ProtocolError(
                RejectReason.MALFORMED, f"transfer {transfer_id} holds more than its {total_size} bytes"
            )
        if self.buffered_bytes + len(env.body) > self.limits.max_buffered_bytes:
            self._drop(key)
            raise ProtocolError(
                RejectReason.MALFORMED,
                f"dropped transfer {transfer_id}: partial transfers would exceed the buffer limit "
                f"({self.limits.max_buffered_bytes} bytes)",
            )
        transfer.pieces[index] = env.body
        transfer.received += len(env.body)
        transfer.last_seen = self.clock()
        if index == total - 1:
            transfer.retain = retain
        if len(transfer.pieces) < total:
            return None
        return self._finish(key, transfer)

    def _start(self, key: tuple[str, str], total: int, total_size: int, sha: str, env: Envelope) -> _Transfer:
        if len(self._transfers) >= self.limits.max_transfers:
            raise ProtocolError(
                RejectReason.MALFORMED,
                f"{len(self._transfers)} partial transfers already (limit {self.limits.max_transfers}); chunk dropped",
            )
        transfer = _Transfer(total, total_size, sha, env.run, env.sender, self.clock())
        self._transfers[key] = transfer
        return transfer

    def _finish(self, key: tuple[str, str], transfer: _Transfer) -> Reassembled:
        self._drop(key)
        whole = b"".join(transfer.pieces[i] for i in range(transfer.total))
        if len(whole) != transfer.total_size:
            raise ProtocolError(
                RejectReason.MALFORMED, f"transfer {key[1]} is {len(whole)} bytes, declared {transfer.total_size}"
            )
        if hashlib.sha256(whole).hexdigest() != transfer.sha256:
            raise ProtocolError(RejectReason.CHECKSUM, f"transfer {key[1]} does not match its sha256; dropped")
        self._recent[key] = None
        while len(self._recent) > self.limits.max_transfers:
            self._recent.popitem(last=False)
        self.stats["completed"] += 1
        return Reassembled(whole, transfer.retain)

    def _drop(self, key: tuple[str, str]) -> None:
        self._transfers.pop(key, None)

    def expire(self) -> list[str]:
        """Drop transfers idle for longer than the timeout; returns what was dropped, for the log."""
        now = self.clock()
        dropped = []
        for key, transfer in list(self._transfers.items()):
            if now - transfer.last_seen > self.limits.idle_timeout_s:
                self._drop(key)
                if key in self._recent:  # the leftovers of a redelivery of something already delivered
                    self.stats["expired_duplicate"] += 1
                    continue
                self.stats["expired"] += 1
                idle = f"{self.limits.idle_timeout_s:.0f}s"
                dropped.append(f"{key[0]}: transfer {key[1]} incomplete after {idle} idle, {transfer.describe()}")
        for line in dropped:
            log.warning("dropped %s", line)
        return dropped


def _chunk_fields(data: dict[str, Any], limits: ChunkLimits) -> tuple[str, int, int, int, str]:
    transfer_id, index, total = data.get("transfer"), data.get("index"), data.get("total")
    total_size, sha = data.get("total_size"), data.get("sha256")
    if not isinstance(transfer_id, str) or not _HEX32.match(transfer_id):
        raise ProtocolError(RejectReason.MALFORMED, "chunk transfer id must be 32 lowercase hex characters")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise ProtocolError(RejectReason.MALFORMED, "chunk sha256 must be 64 lowercase hex characters")
    for name, value in (("index", index), ("total", total), ("total_size", total_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(RejectReason.MALFORMED, f"chunk {name} must be a non-negative integer, got {value!r}")
    if not 1 <= total <= limits.max_chunks:
        raise ProtocolError(RejectReason.MALFORMED, f"chunk total {total} is outside 1..{limits.max_chunks}")
    if index >= total:
        raise ProtocolError(RejectReason.MALFORMED, f"chunk index {index} is not below total {total}")
    if total_size > limits.max_transfer_bytes:
        raise ProtocolError(
            RejectReason.MALFORMED, f"declared size {total_size} is over the {limits.max_transfer_bytes}-byte limit"
        )
    return transfer_id, index, total, total_size, sha
