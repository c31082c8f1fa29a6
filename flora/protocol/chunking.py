"""Split a message that is over the broker's size limit into chunks, and put it back together safely.

Managed brokers cap a publish (AWS IoT Core: 128 KB) and an adapter can be megabytes. A message
larger than `max_message_bytes` is sent as n chunk envelopes (kind "chunk", each a normal FLRA
envelope whose body is one slice of the original payload and carries its own sha256):

    data = {"transfer": 32 hex, "index": i, "total": n, "total_size": bytes, "sha256": hex of the whole}

Chunk i < n - 1 goes to `{topic}/chunk/{i}`, the last one to `{topic}` (see flora/protocol/topics.py).
The receiver (flora/protocol/reassembly.py) keeps at most `ChunkLimits` worth of partial transfers,
per sender and in total, drops a transfer that stays idle for `idle_timeout_s`, and hands the payload
on only when every chunk arrived and the size and sha256 of the whole match. A lost, corrupted or
inconsistent chunk therefore fails that one message (the sender's update misses the round; a retained
instruction is delivered again on reconnect): it never yields a different payload.

Pure logic, no I/O: flora/transport/chunked.py applies it to a Transport.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid

from flora.errors import ProtocolError, RejectReason
from flora.protocol.envelope import Envelope, envelope_to_bytes, read_header
from flora.protocol.reassembly import ChunkLimits, Reassembled, Reassembler
from flora.protocol.topics import chunk_topic

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MIN_MAX_MESSAGE_BYTES",
    "ChunkLimits",
    "Reassembled",
    "Reassembler",
    "is_chunk",
    "mqtt_publish_packet_size",
    "split_message",
]

# Default for both roles: under AWS IoT Core's 128 KB cap on a publish, with headroom for brokers that count
# the limit slightly differently. Mosquitto's max_packet_size counts the whole packet, as we do.
DEFAULT_MAX_MESSAGE_BYTES = 120_000
MIN_MAX_MESSAGE_BYTES = 4096  # leaves room for chunk headers (~500 bytes) and a useful slice of data
MIN_CHUNK_DATA = 1024  # below this the chunk headers would outweigh the data: the limit is misconfigured


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
