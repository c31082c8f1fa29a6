"""Hostile input: random and mutated payloads, envelopes, bodies and chunks reach every decoder.

The property everywhere: a decoder returns a valid result or raises ProtocolError with a RejectReason;
nothing else escapes (no IndexError, KeyError, MemoryError, OverflowError...), and what it keeps in
memory stays under the declared bounds. Hypothesis runs derandomized with no example database, so CI
sees the same examples every time; `test_a_thousand_mutated_messages_through_the_receive_path` counts
its payloads explicitly.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope, adapter_from_body, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.protocol.chunking import ChunkLimits, Reassembler, split_message
from flora.protocol.compression import decompress
from flora.protocol.topics import split_chunk_topic
from flora.transport import MemoryBroker, MemoryTransport, Message
from flora.transport.chunked import ChunkingTransport

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOPIC = "flora/v1/fuzz/update/node-1"
MAX_RAW = 1 << 20  # a small decompression cap, so the bound is checked, not just the default


def _tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"m.lora_A.weight": rng.normal(size=(4, 96)), "m.lora_B.weight": rng.normal(size=(96, 4)) * 0.1}


def _update(encoding: str = "float32", compression: str = "none", seed: int = 0) -> bytes:
    body, meta = adapter_to_body(_tensors(seed), encoding, compression)
    env = Envelope(
        kind="update", run="fuzz", sender="node-1", round=2, data={"num_examples": 7}, body=body, body_meta=meta
    )
    return envelope_to_bytes(env)


SEEDS = [
    _update(),
    _update("float16"),
    _update("bfloat16", "zstd"),
    _update("int8-tensor"),
    _update("int8-channel", "zstd"),
    envelope_to_bytes(Envelope(kind="status", run="fuzz", sender="node-1", data={"state": "online"})),
]
BIG = _update(seed=1)
CHUNKS = split_message(TOPIC, BIG, 4096)
SEEDS += [payload for _, payload in CHUNKS[:2]]


def split_frame(payload: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack(">I", payload[4:8])
    return json.loads(payload[8 : 8 + length]), payload[8 + length :]


def frame(header: dict, body: bytes, *, fix_body: bool) -> bytes:
    """An envelope from a (possibly hostile) header; `fix_body` makes size and sha256 agree with the body."""
    if fix_body and isinstance(header.get("body"), dict):
        header = {**header, "body": {**header["body"], "size": len(body), "sha256": hashlib.sha256(body).hexdigest()}}
    raw = json.dumps(header).encode()
    return b"FLRA" + struct.pack(">I", len(raw)) + raw + body


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, where, blob in ops:
        at = where % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= 1 << (where % 8)
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = blob
        elif op == "overwrite":
            out[at : at + len(blob)] = blob
        elif op == "duplicate":
            out[at:at] = out[at : at + 64]
    return bytes(out)


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "cut", "insert", "overwrite", "duplicate"]),
        st.integers(min_value=0, max_value=2**31),
        st.binary(max_size=24),
    ),
    min_size=1,
    max_size=5,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
HEADER_KEYS = ["v", "kind", "run", "round", "sender", "msg_id", "sent_at", "data", "body"]
BODY_KEYS = ["format", "dtype", "scales", "compression", "raw_size", "tensors", "size", "sha256"]
DATA_KEYS = ["transfer", "index", "total", "total_size", "sha256", "num_examples"]


def decode_fully(payload: bytes) -> None:
    """What a receiver does with a message: the envelope, then the adapter body if there is one."""
    env = envelope_from_bytes(payload)
    if env.body_meta is not None:
        tensors = adapter_from_body(env.body, env.body_meta, max_raw_bytes=MAX_RAW)
        assert all(t.dtype == np.float32 and np.isfinite(t).all() for t in tensors.values())


def rejected_with_a_reason(call, *args) -> RejectReason | None:
    try:
        call(*args)
    except ProtocolError as exc:
        assert isinstance(exc.reason, RejectReason) and exc.detail
        return exc.reason
    return None


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_rejected_with_a_reason(data):
    assert rejected_with_a_reason(decode_fully, data) is not None


@FUZZ
@given(st.sampled_from(SEEDS), MUTATIONS)
def test_mutated_envelopes_never_crash_the_decoder(seed, ops):
    rejected_with_a_reason(decode_fully, mutate(seed, ops))


@FUZZ
@given(
    st.sampled_from(SEEDS[:6]),
    st.lists(st.tuples(st.sampled_from(HEADER_KEYS + BODY_KEYS + DATA_KEYS), JSON_VALUES), min_size=1, max_size=3),
    st.one_of(st.none(), MUTATIONS),
    st.booleans(),
)
def test_hostile_but_well_framed_headers_and_bodies_never_crash_the_decoder(seed, changes, body_ops, fix_body):
    # A hostile sender writes any header it likes and a correct sha256, so the body checks are reached.
    header, body = split_frame(seed)
    for key, value in changes:
        if key in BODY_KEYS and isinstance(header.get("body"), dict):
            header["body"][key] = value
        elif key in DATA_KEYS:
            header["data"] = {**header["data"], key: value} if isinstance(header.get("data"), dict) else value
        else:
            header[key] = value
    if body_ops:
        body = mutate(body, body_ops)
    rejected_with_a_reason(decode_fully, frame(header, body, fix_body=fix_body))


@FUZZ
@given(
    st.sampled_from(SEEDS[:5]),
    MUTATIONS,
    st.dictionaries(st.sampled_from(BODY_KEYS), JSON_VALUES, max_size=3),
)
def test_mutated_adapter_bodies_and_descriptions_never_crash_the_codec(seed, ops, meta_changes):
    env = envelope_from_bytes(seed)
    meta = {**env.body_meta, **meta_changes}
    result = rejected_with_a_reason(adapter_from_body, mutate(env.body, ops), meta)
    assert result is None or isinstance(result, RejectReason)


@FUZZ
@given(st.binary(max_size=512), st.integers(min_value=-5, max_value=1 << 40))
def test_decompression_is_bounded_for_any_frame_and_any_declared_size(data, raw_size):
    meta = {"compression": "zstd", "raw_size": raw_size}
    try:
        out = decompress(b"\x28\xb5\x2f\xfd" + data, meta, max_raw_bytes=MAX_RAW)
    except ProtocolError as exc:
        assert exc.reason is RejectReason.MALFORMED
    else:
        assert len(out) == raw_size <= MAX_RAW


CHUNK_ACTIONS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=len(CHUNKS) - 1),  # which chunk
        st.one_of(st.none(), MUTATIONS),  # corrupt it?
        st.one_of(st.none(), st.integers(min_value=-1, max_value=len(CHUNKS))),  # deliver on another slot?
        st.lists(st.tuples(st.sampled_from(DATA_KEYS), JSON_VALUES), max_size=2),  # forge its fields?
    ),
    max_size=3 * len(CHUNKS),
)


@FUZZ
@given(CHUNK_ACTIONS)
def test_reassembly_of_hostile_chunk_sequences_yields_the_original_or_nothing_within_bounds(actions):
    limits = ChunkLimits(
        max_transfer_bytes=len(BIG) * 2, max_chunks=64, max_transfers=3, max_buffered_bytes=3 * len(BIG)
    )
    reassembler = Reassembler(limits)
    for index, ops, slot_override, forged in actions:
        topic, payload = CHUNKS[index]
        if forged:  # a consistent forgery: fields changed, its own sha256 recomputed
            header, body = split_frame(payload)
            header["data"] = {**header["data"], **dict(forged)}
            payload = frame(header, body, fix_body=True)
        if ops:
            payload = mutate(payload, ops)
        base, slot = split_chunk_topic(topic) or (topic, None)
        if slot_override is not None:
            slot = None if slot_override < 0 else slot_override
        try:
            done = reassembler.add(base, payload, slot=slot)
        except ProtocolError as exc:
            assert isinstance(exc.reason, RejectReason)
        else:
            # Never a different payload: only the original can match the whole-transfer sha256.
            assert done is None or done.payload == BIG
        assert reassembler.pending <= limits.max_transfers
        assert reassembler.buffered_bytes <= limits.max_buffered_bytes


@FUZZ
@given(
    st.lists(st.tuples(st.sampled_from(["", "/chunk/0", "/chunk/7", "/chunk/x"]), st.binary(max_size=300)), max_size=6)
)
def test_the_chunking_transport_never_raises_on_what_the_broker_delivers(messages):
    broker = MemoryBroker()
    receiver = ChunkingTransport(MemoryTransport(broker, "coordinator"), 4096)
    receiver.connect()
    receiver.subscribe("flora/v1/fuzz/update/+")
    raw = MemoryTransport(broker, "hostile")
    raw.connect()
    for suffix, payload in messages:
        raw.publish(Message(TOPIC + suffix, payload))
    delivered = []
    while (message := receiver.receive(timeout=0)) is not None:
        delivered.append(message)
    # Whatever reaches the role is on a base topic: chunk slots are the wrapper's business.
    assert all(split_chunk_topic(m.topic) is None for m in delivered)


def test_a_thousand_mutated_messages_through_the_receive_path():
    """1,500 payloads (random, mutated, hostile-but-well-framed) through the chunking transport and the decoders."""
    rng = random.Random(2024)
    broker = MemoryBroker()
    receiver = ChunkingTransport(MemoryTransport(broker, "coordinator"), 4096)
    receiver.connect()
    receiver.subscribe("flora/v1/fuzz/update/+")
    raw = MemoryTransport(broker, "hostile")
    raw.connect()
    outcomes: dict[str, int] = {}
    total = 1500
    for n in range(total):
        kind = n % 3
        if kind == 0:
            payload = rng.randbytes(rng.randrange(0, 600))
        else:
            seed = rng.choice(SEEDS[:6])
            ops = [
                (
                    rng.choice(["flip", "cut", "insert", "overwrite", "duplicate"]),
                    rng.randrange(2**31),
                    rng.randbytes(8),
                )
                for _ in range(rng.randint(1, 3))
            ]
            if kind == 1:
                payload = mutate(seed, ops)
            else:
                header, body = split_frame(seed)
                header[rng.choice(HEADER_KEYS)] = rng.choice([None, -1, 2**70, "2.0", "x" * 300, [], {}, 1e308, True])
                payload = frame(header, mutate(body, ops), fix_body=True)
        raw.publish(Message(TOPIC, payload))
        message = receiver.receive(timeout=0)
        assert message is not None and message.payload == payload  # unchunked: passed to the role as is
        reason = rejected_with_a_reason(decode_fully, message.payload)
        outcomes[reason.value if reason else "accepted"] = outcomes.get(reason.value if reason else "accepted", 0) + 1
    assert sum(outcomes.values()) == total
    assert outcomes.get("accepted", 0) < total * 0.2  # nearly all are refused, each under a named reason
    assert {"malformed", "checksum_mismatch"} <= set(outcomes)


def _raw_frame(header: bytes, body: bytes = b"") -> bytes:
    return b"FLRA" + struct.pack(">I", len(header)) + header + body


def test_inputs_that_crashed_the_first_decoder_are_now_rejected_with_a_reason():
    # Each of these escaped the v1.0 decoders as a non-ProtocolError exception (found while writing these tests).
    from flora.protocol.codec import safetensors_bytes

    status = b'{"v":"1.0","kind":"status","run":"r","sender":"n",'
    assert rejected_with_a_reason(decode_fully, _raw_frame(status + b'"round":' + b"9" * 5000 + b"}"))  # ValueError
    assert rejected_with_a_reason(decode_fully, _raw_frame(status + b'"sent_at":1' + b"0" * 400 + b"}"))  # Overflow
    bf16 = safetensors_bytes({"w": ("BF16", (2,), b"\x80\x3f\x00\x40")})  # KeyError in safetensors.numpy
    assert rejected_with_a_reason(adapter_from_body, bf16, {"format": "safetensors", "dtype": "float32"})
