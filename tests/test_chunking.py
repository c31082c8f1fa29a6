"""Chunking: split under a size limit, reassemble only verified wholes, within time and memory bounds."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope, envelope_from_bytes, envelope_to_bytes
from flora.protocol.chunking import ChunkLimits, Reassembler, mqtt_publish_packet_size, split_message
from flora.protocol.topics import split_chunk_topic
from flora.transport import MemoryBroker, MemoryTransport, Message, TransportError
from flora.transport.chunked import ChunkingTransport

TOPIC = "flora/v1/run/update/node-1"
LIMIT = 16_384


def big_envelope(size: int = 100_000, *, run="run", sender="node-1", version="1.0", seed: int = 0) -> bytes:
    body = random.Random(seed).randbytes(size)
    env = Envelope(kind="update", run=run, sender=sender, round=4, body=body, body_meta={"format": "safetensors"})
    env.version = version
    return envelope_to_bytes(env)


def add_all(reassembler: Reassembler, pieces, order=None):
    """Feed chunks as the wrapper would (base topic plus slot); returns whatever completed."""
    done = []
    for i in order if order is not None else range(len(pieces)):
        topic, payload = pieces[i]
        split = split_chunk_topic(topic)
        base, slot = split if split else (topic, None)
        result = reassembler.add(base, payload, slot=slot)
        if result is not None:
            done.append(result.payload)
    return done


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# -- splitting ----------------------------------------------------------------------------------
@pytest.mark.parametrize("limit", [4096, LIMIT, 120_000])
def test_every_chunk_fits_the_limit_and_the_last_one_goes_on_the_topic_itself(limit):
    payload = big_envelope(300_000)
    pieces = split_message(TOPIC, payload, limit)
    assert len(pieces) > 1
    for index, (topic, chunk) in enumerate(pieces):
        assert mqtt_publish_packet_size(topic, len(chunk)) <= limit
        expected = TOPIC if index == len(pieces) - 1 else f"{TOPIC}/chunk/{index}"
        assert topic == expected
        env = envelope_from_bytes(chunk)
        assert (env.kind, env.run, env.sender, env.round) == ("chunk", "run", "node-1", 4)
        assert env.data["index"] == index and env.data["total"] == len(pieces)
        assert env.data["sha256"] == hashlib.sha256(payload).hexdigest()
    # Chunks are not padded: all but the last are nearly full (headers take well under 1 KB).
    assert all(mqtt_publish_packet_size(t, len(c)) > limit - 1024 for t, c in pieces[:-1])


def test_packet_size_counts_the_mqtt_header_topic_and_packet_id():
    # fixed header 1 + remaining length 1 + topic length 2 + topic 1 + packet id 2 + payload 3
    assert mqtt_publish_packet_size("t", 3, qos=1) == 10
    assert mqtt_publish_packet_size("t", 3, qos=0) == 8
    assert mqtt_publish_packet_size("t", 200, qos=1) == 1 + 2 + 2 + 1 + 2 + 200  # two length bytes past 127


def test_a_payload_that_is_not_an_envelope_or_too_large_is_not_split():
    with pytest.raises(ProtocolError, match="magic"):
        split_message(TOPIC, os.urandom(50_000), LIMIT)
    with pytest.raises(ProtocolError, match="transfer limit"):
        split_message(TOPIC, big_envelope(50_000), LIMIT, limits=ChunkLimits(max_transfer_bytes=10_000))
    with pytest.raises(ProtocolError, match="raise it to at least"):
        split_message(TOPIC, big_envelope(50_000), 1200)


# -- reassembling -------------------------------------------------------------------------------
def test_chunks_in_any_order_with_duplicates_give_back_the_exact_payload():
    payload = big_envelope()
    pieces = split_message(TOPIC, payload, LIMIT)
    order = list(range(len(pieces)))
    random.Random(1).shuffle(order)
    order.insert(1, order[0])  # a duplicate (QoS 1 redelivery) before the transfer completes
    reassembler = Reassembler()
    assert add_all(reassembler, pieces, order) == [payload]
    assert reassembler.stats["duplicate"] == 1
    assert reassembler.pending == 0 and reassembler.buffered_bytes == 0


def test_a_corrupted_chunk_is_refused_and_the_transfer_never_completes():
    payload = big_envelope()
    pieces = split_message(TOPIC, payload, LIMIT)
    chunk = pieces[1][1]
    flipped = bytearray(chunk)
    flipped[-10] ^= 0x01  # inside the body: the chunk's own sha256 catches it
    reassembler = Reassembler()
    with pytest.raises(ProtocolError) as info:
        reassembler.add(TOPIC, bytes(flipped), slot=1)
    assert info.value.reason is RejectReason.CHECKSUM
    assert add_all(reassembler, pieces, [i for i in range(len(pieces)) if i != 1]) == []
    assert reassembler.stats["completed"] == 0


def test_a_forged_chunk_with_a_valid_own_checksum_fails_the_whole_sha256():
    payload = big_envelope()
    pieces = split_message(TOPIC, payload, LIMIT)
    env = envelope_from_bytes(pieces[0][1])
    env.body = bytes(len(env.body))  # same length, zeros: its own sha256 is recomputed, the whole's is not
    forged = [(pieces[0][0], envelope_to_bytes(env)), *pieces[1:]]
    reassembler = Reassembler()
    with pytest.raises(ProtocolError) as info:
        add_all(reassembler, forged)
    assert info.value.reason is RejectReason.CHECKSUM
    assert reassembler.pending == 0  # dropped, memory freed


def test_a_lost_chunk_expires_after_the_idle_timeout_and_frees_its_memory():
    clock = Clock()
    reassembler = Reassembler(ChunkLimits(idle_timeout_s=30), clock=clock)
    pieces = split_message(TOPIC, big_envelope(), LIMIT)
    assert add_all(reassembler, pieces, range(len(pieces) - 1)) == []  # the last one is lost
    assert reassembler.pending == 1 and reassembler.buffered_bytes > 0
    clock.now = 29
    assert reassembler.expire() == []
    clock.now = 31
    dropped = reassembler.expire()
    assert len(dropped) == 1 and "incomplete" in dropped[0] and "node-1" in dropped[0]
    assert reassembler.pending == 0 and reassembler.buffered_bytes == 0 and reassembler.stats["expired"] == 1


def test_contradicting_chunks_drop_the_transfer():
    pieces = split_message(TOPIC, big_envelope(), LIMIT)
    other = split_message(TOPIC, big_envelope(seed=1), LIMIT)
    env = envelope_from_bytes(other[1][1])
    env.data["transfer"] = envelope_from_bytes(pieces[0][1]).data["transfer"]  # same transfer, other content
    reassembler = Reassembler()
    reassembler.add(TOPIC, pieces[0][1], slot=0)
    with pytest.raises(ProtocolError, match="contradicts"):
        reassembler.add(TOPIC, envelope_to_bytes(env), slot=1)
    assert reassembler.pending == 0


def test_a_chunk_on_the_wrong_slot_is_refused():
    pieces = split_message(TOPIC, big_envelope(), LIMIT)
    with pytest.raises(ProtocolError, match="arrived on chunk slot 3"):
        Reassembler().add(TOPIC, pieces[0][1], slot=3)
    with pytest.raises(ProtocolError, match="arrived on the message topic"):
        Reassembler().add(TOPIC, pieces[0][1], slot=None)


def test_declared_sizes_and_counts_are_bounded_before_anything_is_kept():
    limits = ChunkLimits(max_transfer_bytes=50_000)
    pieces = split_message(TOPIC, big_envelope(100_000), LIMIT)
    with pytest.raises(ProtocolError, match="over the 50000-byte limit"):
        Reassembler(limits).add(TOPIC, pieces[0][1], slot=0)
    small = ChunkLimits(max_chunks=4)
    with pytest.raises(ProtocolError, match=r"outside 1\.\.4"):
        Reassembler(small).add(TOPIC, pieces[0][1], slot=0)
    # Concurrent transfers and buffered memory, in total: two senders hold one transfer each, so a third sender's
    # new transfer is refused (nobody holds more than it would), and a chunk over the memory cap drops its transfer.
    reassembler = Reassembler(ChunkLimits(max_transfers=2, max_buffered_bytes=40_000))
    topics = [f"flora/v1/run/update/node-{i}" for i in range(3)]
    transfers = [split_message(topic, big_envelope(seed=seed), LIMIT) for seed, topic in enumerate(topics[:2])]
    for topic, transfer in zip(topics, transfers):
        reassembler.add(topic, transfer[0][1], slot=0)
    with pytest.raises(ProtocolError, match="partial transfers already"):
        reassembler.add(topics[2], split_message(topics[2], big_envelope(seed=9), LIMIT)[0][1], slot=0)
    with pytest.raises(ProtocolError, match="buffer limit"):
        for slot in range(1, len(transfers[0]) - 1):
            reassembler.add(topics[0], transfers[0][slot][1], slot=slot)
    assert reassembler.buffered_bytes <= 40_000 and reassembler.pending <= 2


# -- the transport wrapper over the in-memory broker -----------------------------------------------------
def pair(broker: MemoryBroker, limit: int | None = LIMIT, receiver_limit: int | None = LIMIT):
    sender = ChunkingTransport(MemoryTransport(broker, "node-1"), limit)
    receiver = ChunkingTransport(MemoryTransport(broker, "coordinator"), receiver_limit)
    sender.connect()
    receiver.connect()
    return sender, receiver


def test_a_message_over_the_broker_limit_arrives_whole_and_a_small_one_unchanged():
    broker = MemoryBroker(max_message_bytes=LIMIT)  # the broker refuses anything larger
    sender, receiver = pair(broker, receiver_limit=None)  # a receiver with no limit of its own still reassembles
    receiver.subscribe("flora/v1/run/update/+")
    payload = big_envelope(200_000)
    raw = MemoryTransport(broker, "raw")
    raw.connect()
    with pytest.raises(TransportError, match="exceeds broker limit"):  # the same message without chunking
        raw.publish(Message(TOPIC, payload))
    sender.publish(Message(TOPIC, payload))
    small = big_envelope(100)
    sender.publish(Message(TOPIC, small))
    assert receiver.receive(1).payload == payload
    got = receiver.receive(1)
    assert got.payload == small and got.topic == TOPIC
    assert receiver.receive(0.05) is None


def test_a_retained_chunked_message_reaches_a_late_subscriber_and_a_replacement_clears_its_slots():
    broker = MemoryBroker()
    instruction = "flora/v1/run/instruction"
    coordinator = ChunkingTransport(MemoryTransport(broker, "coordinator"), LIMIT)
    coordinator.connect()
    train = big_envelope(100_000, sender="coordinator")
    coordinator.publish(Message(instruction, train, retain=True))
    late = ChunkingTransport(MemoryTransport(broker, "late"), LIMIT)
    late.connect()
    late.subscribe(instruction)
    got = late.receive(1)
    assert got.payload == train and got.topic == instruction and got.retain
    # "finished" is small: it replaces the last chunk on the topic and the old slots are cleared.
    finished = envelope_to_bytes(Envelope(kind="finished", run="run", sender="coordinator", round=4))
    coordinator.publish(Message(instruction, finished, retain=True))
    assert not [t for t in broker._retained if t.startswith(instruction + "/chunk/")]
    later = ChunkingTransport(MemoryTransport(broker, "later"), LIMIT)
    later.connect()
    later.subscribe(instruction)
    assert later.receive(1).payload == finished
    assert later.receive(0.05) is None and later.reassembler.pending == 0


def test_a_chunk_from_another_major_version_reaches_the_role_which_reports_it():
    broker = MemoryBroker()
    sender, receiver = pair(broker)
    receiver.subscribe("flora/v1/run/update/+")
    pieces = split_message(TOPIC, big_envelope(), LIMIT)
    env = envelope_from_bytes(pieces[0][1])
    env.version = "2.0"
    sender.inner.publish(Message(pieces[0][0], envelope_to_bytes(env)))
    got = receiver.receive(1)
    assert got.topic == TOPIC  # on the base topic, so the coordinator knows which node it came from
    with pytest.raises(ProtocolError) as info:
        envelope_from_bytes(got.payload)
    assert info.value.reason is RejectReason.VERSION and "upgrade the older side" in str(info.value)


def test_garbage_on_a_chunk_slot_is_dropped_and_garbage_on_a_topic_passes_to_the_role():
    broker = MemoryBroker()
    sender, receiver = pair(broker)
    receiver.subscribe("flora/v1/run/update/+")
    sender.inner.publish(Message(TOPIC + "/chunk/0", b"\x00garbage"))
    sender.inner.publish(Message(TOPIC, b"\x00garbage"))  # as before chunking existed: the role counts it
    assert receiver.receive(1).payload == b"\x00garbage"
    assert receiver.receive(0.05) is None
    assert receiver.reassembler.stats["rejected_malformed"] == 1


def test_an_oversize_will_is_refused_before_connecting():
    transport = ChunkingTransport(MemoryTransport(MemoryBroker(), "n"), 4096)
    with pytest.raises(TransportError, match="cannot be chunked"):
        transport.connect(will=Message("flora/v1/run/status/n", bytes(5000)))
