"""The coordinator's update intake: collect a round's updates, check each, answer the ones refused.

Split from coordinator/server.py (the round loop): `UpdateIntake` is the half of `Coordinator` that takes
updates. Per round it keeps a `Collected`: who was accepted, what was refused and why, who was dropped.

A refused update is answered: the sender gets a `reject` notice on `notice/{node}` (docs/PROTOCOL.md §5.8) saying
why and what to fix, and, when the refusal is final for the round (its adapter, metrics or signature are wrong:
sending it again changes nothing), the node is dropped from the round at once, so the round closes as soon as
everyone selected has answered or been refused instead of waiting for the deadline. Refusals that say nothing
about the node's answer (a duplicate, a late or early round, another run, not selected) neither drop it nor
notify it. One notice per node per round: what a flood of bad updates makes us send is bounded by the fleet.

A recovery re-send (the same update again after a restart: the broker's queued copy and the client's re-send of
its pending update both arrive, or a re-send arrives after its round closed) is not a rejection: it is counted as
`resent` in the round's record, apart from `rejected`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

from coordinator.events import UpdateAccepted, UpdateRejected
from coordinator.intake import check_early_update, max_update_bytes
from coordinator.notices import reject_notice
from coordinator.validation import validate_update
from coordinator.weighting import cap_weight
from flora.algorithms import ClientUpdate
from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope, Topics, envelope_from_bytes
from flora.protocol.envelope import check_id
from flora.throttled_log import ThrottledLog
from flora.transport import Message

drops = ThrottledLog("coordinator.server")


def is_valid_id(node: str) -> bool:
    try:
        check_id(node, "node id")
    except ProtocolError:
        return False
    return True


# rejections: a flood of them must not flood the log

# Refusals that say nothing about the node's answer to this round: it may still send the right one.
NOT_FINAL = frozenset(
    {
        RejectReason.DUPLICATE,
        RejectReason.WRONG_ROUND,
        RejectReason.WRONG_RUN,
        RejectReason.NOT_SELECTED,
        RejectReason.VERSION,  # it cannot read our notice either; the error is logged loudly (§9)
    }
)


@dataclasses.dataclass
class Collected:
    """What one attempt at a round collected."""

    selected: set[str]
    accepted: dict[str, ClientUpdate] = dataclasses.field(default_factory=dict)  # tensors already folded in
    accepted_ids: dict[str, str] = dataclasses.field(default_factory=dict)  # node -> msg_id: tells a re-send
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # selected node -> why it was refused
    notified: set[str] = dataclasses.field(default_factory=set)
    resent: int = 0
    bytes_up: int = 0

    def waiting_for(self) -> set[str]:
        return self.selected - self.accepted.keys() - self.dropped.keys()


class UpdateIntake:
    """Mixed into Coordinator (coordinator/server.py), whose state it uses: config, auth, strategy, registry,
    events, transport, history, rejections, next_round, and the per-round error meter and early-update store."""

    def _collect(self, round_: int, selected: set[str]) -> Collected:
        deadline = time.monotonic() + self.config.round_deadline_s
        collected = Collected(selected=set(selected))
        early = self._early.take()
        self._open_round = round_
        try:
            while collected.waiting_for() and time.monotonic() < deadline:
                message = early.pop(0) if early else self._pump(min(0.5, max(0.01, deadline - time.monotonic())))
                if message is None:
                    continue
                collected.bytes_up += self._take_update(message, round_, collected)
        finally:
            self._open_round = None
        if collected.dropped:
            logging.getLogger("coordinator.server").warning(
                "round %d: %d selected node(s) refused and dropped from the round: %s",
                round_,
                len(collected.dropped),
                "; ".join(f"{node}: {why}" for node, why in sorted(collected.dropped.items())[:8]),
            )
        return collected

    def _take_update(self, message: Message, round_: int, collected: Collected) -> int:
        """Check one update and fold it in (returns its bytes), or count its rejection (returns 0)."""
        received_at = time.monotonic()
        node = Topics.node_of(message.topic)
        env: Envelope | None = None
        verified = False
        try:
            env = envelope_from_bytes(message.payload)
            verified = self.auth.check_update(message.payload, env, node)
            update = validate_update(
                env,
                topic_node=node,
                run_id=self.config.run_id,
                round_=round_,
                selected=collected.selected,
                already=set(collected.accepted),
                global_tensors=self.strategy.expected_update(self.global_tensors),
                max_update_norm=self.config.max_update_norm,
                payload_bytes=len(message.payload),
                allow_lower_rank=self.strategy.accepts_lower_rank,
            )
            self.auth.check_binding(env, verified)
        except ProtocolError as exc:
            if env is not None and self._is_resend(exc, env, collected):
                collected.resent += 1
                return 0
            self._count_rejection(exc, message.topic, collected.rejected)
            self._answer_rejection(exc, node, round_, collected, trusted=verified or not self.auth.required)
            return 0
        update = cap_weight(update, self.registry, collected.selected, self.config.max_weight_factor)
        validated_at = time.monotonic()
        self.strategy.accumulate(update)
        aggregated_at = time.monotonic()
        self.error_meter.add(update.tensors, update.num_examples)
        # Keep who answered and their metrics, not their tensors: those are already folded into the
        # strategy, and holding 500 updates' tensors would make memory grow with the fleet.
        collected.accepted[update.node] = dataclasses.replace(update, tensors={})
        collected.accepted_ids[update.node] = env.msg_id
        self.events.emit(
            UpdateAccepted(
                round=round_,
                node=update.node,
                num_examples=update.num_examples,
                bytes=len(message.payload),
                metrics=dict(update.metrics),
                received_at=received_at,
                validated_at=validated_at,
                aggregated_at=aggregated_at,
            )
        )
        return len(message.payload)

    def _is_resend(self, exc: ProtocolError, env: Envelope, collected: Collected | None) -> bool:
        """A copy of an update already accepted: the same message again in this round, or an update of a closed
        round from a node that round accepted (a restarted client re-sends what it was not told was taken)."""
        if env.kind != "update" or env.run != self.config.run_id:
            return False
        if exc.reason is RejectReason.DUPLICATE and collected is not None:
            return collected.accepted_ids.get(env.sender) == env.msg_id
        if (
            exc.reason is RejectReason.WRONG_ROUND
            and isinstance(env.round, int)
            and 1 <= env.round <= len(self.history)
        ):
            return env.sender in self.history[env.round - 1].accepted
        return False

    def _answer_rejection(self, exc: ProtocolError, node: str, round_: int, collected: Collected, *, trusted: bool):
        """Tell `node` why (once per round), and drop it from the round when the refusal is final. With device
        keys, only an update whose signature verified can drop its node: on an open broker anyone can publish
        garbage on another node's topic, and that must not cost the real node its round."""
        if exc.reason in NOT_FINAL or not is_valid_id(node):  # a topic level no notice topic can be built for
            return
        if trusted and node in collected.selected and node not in collected.accepted:
            collected.dropped[node] = exc.reason.value
        if node in collected.notified:
            return
        collected.notified.add(node)
        notice = reject_notice(self.config, node, round_, exc, self.strategy.accepts_lower_rank)
        self.transport.publish(Message(self.topics.notice(node), self.auth.seal(notice), qos=1))

    def _hold_or_reject(self, message: Message) -> None:
        """An update before its round opened: keep it if it is for the round about to open (it was queued by
        the broker while we were down, or answers an earlier attempt), otherwise reject it. It is checked
        (identity, size, signature) before it is held, and held within a bound (coordinator/intake.py)."""
        node = Topics.node_of(message.topic)
        env: Envelope | None = None
        try:
            env = envelope_from_bytes(message.payload)
            check_early_update(
                env,
                topic_node=node,
                run_id=self.config.run_id,
                round_=self.next_round,
                payload_bytes=len(message.payload),
                max_bytes=max_update_bytes(self.strategy.expected_update(self.global_tensors)),
            )
            self.auth.check_update(message.payload, env, node)
            self._early.hold(node, message)
        except ProtocolError as exc:
            if env is not None and self._is_resend(exc, env, None):
                self._resent_between_rounds += 1  # counted in the next round's record
                return
            self._count_rejection(exc, message.topic, collections.Counter())

    def _count_rejection(self, exc: ProtocolError, topic: str, rejected: collections.Counter) -> None:
        rejected[exc.reason.value] += 1
        self.rejections[exc.reason.value] += 1
        level = logging.ERROR if exc.reason is RejectReason.VERSION else logging.WARNING
        kind = topic.rsplit("/", 2)[-2] if topic.count("/") >= 2 else ""  # "update" or "status": a bounded set
        drops.log(level, f"{exc.reason.value} {kind}", "rejected message on %s: %s", topic, exc)
        self.events.emit(
            UpdateRejected(
                round=self._open_round, topic=topic, node=Topics.node_of(topic), reason=exc.reason, detail=exc.detail
            )
        )
