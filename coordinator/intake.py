"""Updates that arrive before their round opens: checked like any update as far as possible, then held in a bound.

While the coordinator waits for clients (before the first round, or between two attempts at a round), an update
for the round about to open is not noise: the broker queued it for us during a restart, or it answers the
previous attempt and its sender may be selected again. It is held until the round opens and then taken like
any other update. Everything about it came off the network, so before it is held:

- it must be an update of this run for the round about to open, from the node whose topic it came on (the ACL
  binds the topic to the device; the envelope's `sender` is only a claim);
- it must be no larger than an update of this run's adapter can be (`max_update_bytes`): a device cannot make us
  hold 64 MiB because the transport allows it;
- with device keys, its signature must verify (the caller checks it: coordinator/signatures.py).

And then the memory held is bounded per sender and in total: at most one update per node (the newest replaces
the older: a client that answered twice answered last with what it means), and `max_total_bytes` for all.
"""

from __future__ import annotations

import collections
from typing import Any

from coordinator.validation import check_update_identity
from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope
from flora.transport import Message

MAX_EARLY_UPDATES = 10_000  # held updates, all nodes (one per node, so this is a fleet of 10,000)
MAX_EARLY_BYTES = 64 * 1024 * 1024  # held updates' payloads, all nodes (500 paper-recipe updates take 50 MB)
# An envelope's header, metrics and safetensors index on top of the tensors' float32 bytes; and what a
# compressor can add to incompressible data (zlib: 5 bytes per 16 KB block, zstd less).
UPDATE_HEADER_ALLOWANCE = 64 * 1024
COMPRESSION_EXPANSION = 1.01


def max_update_bytes(expected: dict[str, Any]) -> int:
    """The largest payload an honest update of these tensors can be: float32 (the widest wire encoding),
    uncompressible, with a generous header. Lower ranks and narrower encodings are smaller."""
    raw = sum(int(getattr(t, "size", 0)) * 4 + 256 for t in expected.values())  # 256: a tensor's safetensors entry
    return int(raw * COMPRESSION_EXPANSION) + UPDATE_HEADER_ALLOWANCE


def check_early_update(
    env: Envelope, *, topic_node: str, run_id: str, round_: int, payload_bytes: int, max_bytes: int
) -> None:
    """Whether an update may be held for round `round_` (the one about to open); raises ProtocolError if not."""
    check_update_identity(env, topic_node=topic_node, run_id=run_id, round_=round_, when="while no round is open")
    if payload_bytes > max_bytes:
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"update of {payload_bytes} bytes, larger than an update of this run's adapter can be ({max_bytes})",
        )


class EarlyUpdates:
    """The updates held for the round about to open: one per node, within a total byte budget."""

    def __init__(self, max_total_bytes: int = MAX_EARLY_BYTES, max_count: int = MAX_EARLY_UPDATES):
        self.max_total_bytes = max_total_bytes
        self.max_count = max_count
        self._held: collections.OrderedDict[str, Message] = collections.OrderedDict()  # node -> update, by arrival
        self.bytes = 0

    def hold(self, node: str, message: Message) -> None:
        """Keep `message` as `node`'s update (replacing an older one), or raise ProtocolError when over budget.

        Raises DUPLICATE after replacing (the older update is the one dropped, and it is worth counting)."""
        older = self._held.pop(node, None)
        if older is not None:
            self.bytes -= len(older.payload)
        if self.bytes + len(message.payload) > self.max_total_bytes or len(self._held) >= self.max_count:
            if older is not None:  # put the older one back: a refused newer one must not cost the node its update
                self._held[node] = older
                self.bytes += len(older.payload)
            raise ProtocolError(
                RejectReason.MALFORMED,
                f"{len(self._held)} early updates hold {self.bytes} bytes (limits {self.max_count}, "
                f"{self.max_total_bytes} bytes); update from {node} dropped",
            )
        self._held[node] = message
        self.bytes += len(message.payload)
        if older is not None:
            raise ProtocolError(
                RejectReason.DUPLICATE, f"{node} sent a newer update for the next round; the older is dropped"
            )

    def take(self) -> list[Message]:
        """Everything held, in arrival order; the store is empty afterwards."""
        held, self._held, self.bytes = list(self._held.values()), collections.OrderedDict(), 0
        return held

    def __len__(self) -> int:
        return len(self._held)
