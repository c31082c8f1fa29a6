"""Reassembly budgets: per sender and in total, counted as the memory really held; one sender cannot starve another."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import uuid
import warnings

import pytest

from flora.errors import ProtocolError
from flora.protocol import Envelope, envelope_to_bytes
from flora.protocol.chunking import ChunkLimits, Reassembler, split_message
from tests.test_chunking import LIMIT, add_all, big_envelope

MiB = 1024 * 1024


def update_topic(node: str) -> str:
    return f"flora/v1/run/update/{node}"


def first_chunks(node: str, count: int, size: int = 60_000) -> list[bytes]:
    """The first chunk of `count` distinct transfers from `node`: partial transfers that never complete."""
    return [
        split_message(update_topic(node), big_envelope(size, sender=node, seed=i), LIMIT)[0][1] for i in range(count)
    ]


def hostile_add(reassembler: Reassembler, topic: str, payload: bytes, slot: int | None) -> None:
    # Refusing the attacker's chunk is fine; what matters is what happens to everyone else.
    with contextlib.suppress(ProtocolError):
        reassembler.add(topic, payload, slot=slot)


def test_one_sender_holding_300_partial_transfers_does_not_starve_another_senders_update():
    reassembler = Reassembler()
    for chunk in first_chunks("mallory", 300):
        hostile_add(reassembler, update_topic("mallory"), chunk, 0)
    honest = big_envelope(100_000, sender="alice", seed=7)
    assert add_all(reassembler, split_message(update_topic("alice"), honest, LIMIT)) == [honest]
    count, _ = reassembler.held_by("mallory")
    assert count <= reassembler.limits.max_transfers_per_sender


def test_a_sender_over_its_quota_loses_its_oldest_transfer_and_its_newest_completes():
    limits = ChunkLimits(max_transfers_per_sender=2)
    reassembler = Reassembler(limits)
    topic = update_topic("node-1")
    payloads = [big_envelope(50_000, seed=i) for i in range(3)]
    transfers = [split_message(topic, payload, LIMIT) for payload in payloads]
    for pieces in transfers:
        reassembler.add(topic, pieces[0][1], slot=0)
    assert reassembler.held_by("node-1")[0] == 2 and reassembler.stats["evicted"] == 1
    assert add_all(reassembler, transfers[0][1:]) == []  # the oldest was dropped: its first chunk is gone for good
    assert add_all(reassembler, transfers[2][1:]) == [payloads[2]]


def test_a_full_buffer_makes_the_biggest_holder_give_way_not_a_small_sender():
    limits = ChunkLimits(max_buffered_bytes=400_000)
    reassembler = Reassembler(limits)
    flood = split_message(update_topic("mallory"), big_envelope(1_000_000, sender="mallory"), LIMIT)
    for slot in range(23):  # ~366 KB of a transfer mallory never completes: the buffer is nearly full
        reassembler.add(update_topic("mallory"), flood[slot][1], slot=slot)
    honest = big_envelope(100_000, sender="alice", seed=3)
    assert add_all(reassembler, split_message(update_topic("alice"), honest, LIMIT)) == [honest]
    assert reassembler.held_by("mallory") == (0, 0) and reassembler.stats["evicted"] == 1
    assert reassembler.buffered_bytes <= limits.max_buffered_bytes


def _rss() -> int:
    """Resident memory of what is held: freed blocks are handed back to the OS first (glibc keeps them)."""
    with warnings.catch_warnings():  # an integration test run before may have dropped a broker socket unclosed
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_the_budget_counts_the_memory_a_flood_of_tiny_chunks_really_takes():
    # 120,000 one-byte chunks of one transfer take ~10 MB of RSS (about 84 bytes each), though their payload
    # is 120 KB. With a 4 MiB budget, the memory they make us hold must stay within 4 MiB.
    budget = 4 * MiB
    limits = ChunkLimits(max_chunks=200_000, max_buffered_bytes=budget)
    reassembler = Reassembler(limits)
    count, transfer = 120_000, uuid.uuid4().hex
    data = {"transfer": transfer, "total": count + 1, "total_size": count + 1, "sha256": "0" * 64}
    chunks = [
        envelope_to_bytes(Envelope(kind="chunk", run="run", sender="m", round=1, data={**data, "index": i}, body=b"x"))
        for i in range(count)
    ]
    gc.collect()
    before = _rss()
    for index, chunk in enumerate(chunks):
        hostile_add(reassembler, update_topic("m"), chunk, index)
    gc.collect()
    grown = _rss() - before
    assert reassembler.buffered_bytes <= budget
    assert grown <= budget, f"RSS grew {grown / MiB:.1f} MiB holding tiny chunks, budget {budget / MiB:.0f} MiB"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_the_counted_memory_is_an_upper_bound_of_the_rss_of_partial_transfers():
    # The overhead constants are measured; this keeps them honest: 2,000 partial transfers of 20 x 1,000-byte
    # chunks each, from 500 senders, must not take more RSS than the budget says they hold.
    limits = ChunkLimits(max_transfers=4096, max_buffered_bytes=1 << 40)
    reassembler = Reassembler(limits)
    chunks = []
    for t in range(2000):
        data = {"transfer": uuid.uuid4().hex, "total": 21, "total_size": 21_000, "sha256": "0" * 64}
        for i in range(20):
            env = Envelope(
                kind="chunk", run="run", sender="n", round=1, data={**data, "index": i}, body=os.urandom(1000)
            )
            chunks.append((update_topic(f"node-{t % 500}"), envelope_to_bytes(env), i))
    gc.collect()
    before = _rss()
    for topic, chunk, index in chunks:
        reassembler.add(topic, chunk, slot=index)
    gc.collect()
    grown = _rss() - before
    assert reassembler.pending == 2000
    assert grown <= reassembler.buffered_bytes, f"RSS grew {grown} bytes, counted {reassembler.buffered_bytes}"
