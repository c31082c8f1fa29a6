"""Put chunked messages back together within a memory budget that no single sender can exhaust.

The wire format and the sending side are flora/protocol/chunking.py (docs/PROTOCOL.md §2.1). This module is
the receiving side, and every byte it keeps came off the network, so it keeps them under three kinds of bound:

- per transfer: its declared size and chunk count (ChunkLimits.max_transfer_bytes, max_chunks);
- per sender: partial transfers and held memory (max_transfers_per_sender, max_sender_bytes). The sender is
  the last level of the message topic: the node id on `update/{node}` and `status/{node}`, which the
  broker's ACL binds to the device's account (PROTOCOL §13.2), so one device is one sender however it fills
  in its envelopes;
- in total: partial transfers and held memory (max_transfers, max_buffered_bytes).

Held memory is the real cost, not the payload: a chunk costs its bytes plus CHUNK_OVERHEAD_BYTES, a transfer
TRANSFER_OVERHEAD_BYTES on top (measured, see there). A flood of 1-byte chunks therefore fills the budget as
fast as the memory it takes.

What gives way when a bound is reached is always the sender's own state, or the state of whoever holds more:

- a sender over its own quota loses its OLDEST partial transfer (a device that rebooted mid-transfer and
  sends again must get the new one through; its stale one could only wait to expire). A chunk that alone
  would not fit the sender's quota is refused.
- when the total is reached, the sender holding the most (transfers, or bytes) loses its oldest transfer;
  if that is the sender of this chunk, the chunk's own sender pays. So a sender within its fair share of
  the total is never displaced by one above it: one device cannot starve the others' updates.

On an open broker (no ACL) a sender is any topic anyone picks; the total bounds still hold, fairness then
only holds between topics.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from flora.errors import ProtocolError, RejectReason
from flora.protocol.envelope import Envelope, envelope_from_bytes
from flora.throttled_log import ThrottledLog

log = ThrottledLog(__name__)

# Measured with RSS on CPython 3.12 (x86-64): a 1-byte chunk held 84 bytes of RSS, a 1,000-byte one 1,140
# (the bytes object, its int index, its dict slot, malloc rounding); a one-chunk transfer about 350 bytes
# more. Rounded up, so the budget is an upper bound of the memory held (tests/test_reassembly.py checks it).
CHUNK_OVERHEAD_BYTES = 160
TRANSFER_OVERHEAD_BYTES = 1024
SWEEP_INTERVAL_S = 1.0  # idle transfers are looked for at most this often (a timeout is tens of seconds)

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class ChunkLimits:
    """What a receiver is willing to buffer. Every bound is checked before the bytes are kept."""

    max_transfer_bytes: int = 64 * 1024 * 1024  # the largest message one transfer may declare
    max_chunks: int = 32_768  # chunks per transfer (64 MiB in ~2 KB chunks at the smallest sane limit)
    max_transfers: int = 1024  # partial transfers at once, all senders (a fleet of 500 chunking at once fits)
    max_buffered_bytes: int = 256 * 1024 * 1024  # memory held by all partial transfers
    idle_timeout_s: float = 120.0  # a transfer with no new chunk for this long is dropped
    # One sender: room for one message in flight and a stale one it abandoned (a reboot mid-transfer).
    max_transfers_per_sender: int = 4
    max_sender_bytes: int = 80 * 1024 * 1024  # one 64 MiB transfer with its chunk overhead, and some


class Reassembled(NamedTuple):
    payload: bytes
    retain: bool  # the retain flag of the last chunk: whether the whole message came as a retained one


@dataclasses.dataclass
class _Transfer:
    sender: str  # the topic's sender, whose quota this transfer counts against (not the envelope's claim)
    total: int
    total_size: int
    sha256: str
    run: str
    claimed_sender: str  # the envelope's sender field: every chunk must agree on it
    started: float
    last_seen: float
    pieces: dict[int, bytes] = dataclasses.field(default_factory=dict)
    received: int = 0  # payload bytes held in `pieces`
    cost: int = TRANSFER_OVERHEAD_BYTES  # memory held, as counted against the budgets
    retain: bool = False  # the retain flag of the last chunk: how the whole message was delivered

    def describe(self) -> str:
        return f"{len(self.pieces)}/{self.total} chunks ({self.received}/{self.total_size} bytes) from {self.sender}"


def sender_of_topic(topic: str) -> str:
    """The last level of the message topic: the node on update/{node} and status/{node}."""
    return topic.rsplit("/", 1)[-1]


class Reassembler:
    """Collects chunks per (topic, transfer) within `ChunkLimits`; `add` returns a payload once complete.

    `stats` counts outcomes (completed, duplicate, expired, evicted, rejected_<reason>) for logs and tests.
    """

    def __init__(
        self,
        limits: ChunkLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        sender_of: Callable[[str], str] = sender_of_topic,
    ):
        self.limits = limits or ChunkLimits()
        self.clock = clock
        self.sender_of = sender_of
        self.stats: collections.Counter[str] = collections.Counter()
        self._transfers: dict[tuple[str, str], _Transfer] = {}
        self._held: collections.Counter[str] = collections.Counter()  # sender -> memory held (cost)
        self._count: collections.Counter[str] = collections.Counter()  # sender -> partial transfers
        # Transfers delivered lately: their redelivered chunks (retained copy plus session queue) are
        # expected, so a partial duplicate that expires is not worth a warning.
        self._recent: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._swept = float("-inf")  # when expire() last ran

    @property
    def buffered_bytes(self) -> int:
        """Memory held by partial transfers, as counted against the budgets (payload plus overheads)."""
        return sum(self._held.values())

    @property
    def pending(self) -> int:
        return len(self._transfers)

    def held_by(self, sender: str) -> tuple[int, int]:
        """(partial transfers, memory held) for one sender."""
        return self._count[sender], self._held[sender]

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
        self.expire_due()
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
        elif (transfer.total, transfer.total_size, transfer.sha256, transfer.run, transfer.claimed_sender) != (
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
        self._make_room(key, len(env.body) + CHUNK_OVERHEAD_BYTES)
        transfer.pieces[index] = env.body
        transfer.received += len(env.body)
        self._charge(transfer, len(env.body) + CHUNK_OVERHEAD_BYTES)
        transfer.last_seen = self.clock()
        if index == total - 1:
            transfer.retain = retain
        if len(transfer.pieces) < total:
            return None
        return self._finish(key, transfer)

    # -- the budgets ----------------------------------------------------------------------------
    def _start(self, key: tuple[str, str], total: int, total_size: int, sha: str, env: Envelope) -> _Transfer:
        sender = self.sender_of(key[0])
        if self._count[sender] >= self.limits.max_transfers_per_sender:
            self._evict(self._oldest(sender), f"{sender} opened more than {self.limits.max_transfers_per_sender}")
        if len(self._transfers) >= self.limits.max_transfers:
            # The sender with the most partial transfers gives one up, if it would still hold at least as many as
            # this chunk's sender (no see-saw between two senders); otherwise this sender does, or is refused.
            biggest = max(self._count, key=lambda s: self._count[s])
            if self._count[biggest] <= self._count[sender] + 1:
                biggest = sender
            if self._count[biggest] == 0:
                raise ProtocolError(
                    RejectReason.MALFORMED,
                    f"{len(self._transfers)} partial transfers already (limit {self.limits.max_transfers}); "
                    f"chunk from {sender} dropped",
                )
            self._evict(self._oldest(biggest), f"{self.limits.max_transfers} partial transfers in all")
        now = self.clock()
        transfer = _Transfer(sender, total, total_size, sha, env.run, env.sender, now, now)
        self._transfers[key] = transfer
        self._count[sender] += 1
        self._held[sender] += transfer.cost
        return transfer

    def _make_room(self, key: tuple[str, str], need: int) -> None:
        """Free memory for `need` more bytes in transfer `key`, or drop that transfer and raise."""
        sender = self._transfers[key].sender
        while self._held[sender] + need > self.limits.max_sender_bytes:
            older = [k for k, t in self._transfers.items() if t.sender == sender and k != key]
            if not older:
                self._refuse(key, f"it would hold more than {self.limits.max_sender_bytes} bytes for {sender}")
            self._evict(self._oldest(sender, besides=key), f"{sender} is over its {self.limits.max_sender_bytes} bytes")
        while self.buffered_bytes + need > self.limits.max_buffered_bytes:
            # Whoever holds more than this sender would with the chunk gives way; otherwise the sender itself does.
            biggest = max(self._held, key=lambda s: self._held[s])
            if self._held[biggest] <= self._held[sender] + need:
                biggest = sender
            victim = self._oldest(biggest, besides=key)
            if victim is None:
                self._refuse(key, f"partial transfers would exceed the buffer limit ({self.limits.max_buffered_bytes})")
            self._evict(victim, f"the buffer limit ({self.limits.max_buffered_bytes} bytes) was reached")

    def _oldest(self, sender: str, besides: tuple[str, str] | None = None) -> tuple[str, str] | None:
        mine = [(t.started, k) for k, t in self._transfers.items() if t.sender == sender and k != besides]
        return min(mine)[1] if mine else None

    def _evict(self, key: tuple[str, str] | None, why: str) -> None:
        if key is None:
            return
        transfer = self._transfers[key]
        self._drop(key)
        self.stats["evicted"] += 1
        log.warning("evicted", "dropped partial transfer %s on %s (%s): %s", key[1], key[0], transfer.describe(), why)

    def _refuse(self, key: tuple[str, str], why: str) -> None:
        self._drop(key)
        raise ProtocolError(RejectReason.MALFORMED, f"dropped transfer {key[1]}: {why}")

    def _charge(self, transfer: _Transfer, cost: int) -> None:
        transfer.cost += cost
        self._held[transfer.sender] += cost

    # -- completion and expiry ------------------------------------------------------------------
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
        transfer = self._transfers.pop(key, None)
        if transfer is None:
            return
        for counter, amount in ((self._count, 1), (self._held, transfer.cost)):
            counter[transfer.sender] -= amount
            if counter[transfer.sender] <= 0:
                del counter[transfer.sender]  # a sender that holds nothing costs nothing either

    def expire_due(self) -> list[str]:
        """`expire`, at most every SWEEP_INTERVAL_S: a sweep visits every partial transfer, and it must not
        run for each of thousands of chunks a second."""
        if self.clock() - self._swept < SWEEP_INTERVAL_S:
            return []
        return self.expire()

    def expire(self) -> list[str]:
        """Drop transfers idle for longer than the timeout; returns what was dropped, for the log."""
        now = self._swept = self.clock()
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
            log.warning("expired", "dropped %s", line)
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
