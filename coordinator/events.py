"""What the coordinator's round loop tells the world: typed events, and the bus that delivers them.

The round loop (coordinator/server.py) does the federation; everything that only *observes* it (report.json
and the output adapter, metrics.png, the live terminal view, experiment trackers, a benchmark's timer) is a
subscriber. A subscriber is a callable taking every event, or an object with `on_<event>` methods
(`on_round_ended(event)` for RoundEnded); it is called synchronously, in subscription order, on the
coordinator's thread, so it sees a consistent state and must be quick.

A subscriber that raises is logged and the round goes on: a tracker that cannot reach its server must not cost
a federated round. A subscriber subscribed with `required=True` (the report writer: the run's outputs are the
product) propagates its error and stops the run, which a rerun resumes from the last checkpoint.

The checkpoint is not a subscriber but a built-in step of the round, before `CheckpointSaved` is emitted: it is
what crash recovery stands on (state.json must name the round before its result is published or any output
claims it), so its ordering cannot depend on who subscribed first, and no subscriber can opt out of it.

Every event carries `at`, a time.monotonic() stamp taken when it was built; phase durations are differences of
these stamps (bench/coordinator_scale.py's timer does exactly that).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flora.errors import RejectReason
from flora.records import RoundRecord, RunReport

__all__ = [
    "Aggregated",
    "CheckpointSaved",
    "Evaluated",
    "Event",
    "EventBus",
    "InstructionPublished",
    "ResultPublished",
    "RoundEnded",
    "RoundStarted",
    "RunFailed",
    "RunFinished",
    "RunResumed",
    "RunStarted",
    "UpdateAccepted",
    "UpdateRejected",
    "UpdatesCollected",
    "handler_name",
]

log = logging.getLogger(__name__)


def _now() -> float:
    return time.monotonic()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    at: float = dataclasses.field(default_factory=_now)  # time.monotonic() when the event was built


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    """The coordinator is connected and about to run `first_round` (> 1 after a resume)."""

    run_id: str
    first_round: int
    rounds_total: int
    report: RunReport  # the run so far: settings, initial evaluation, resumed rounds
    config: dict[str, Any]  # the coordinator's settings, JSON-able (paths as strings), secrets left out


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResumed(Event):
    """Emitted right after RunStarted when the run resumed after a checkpointed round: the outputs of that round
    are written again, since a crash after state.json named it may have come before they were (kill -9 between
    the checkpoint and RoundEnded's subscribers). The round's result is re-published after this."""

    round: int  # the last checkpointed round
    record: RoundRecord
    report: RunReport


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFinished(Event):
    report: RunReport


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFailed(Event):
    """The run stopped on an error (or an interrupt); a rerun resumes from the last checkpoint."""

    round: int
    error: str


# -- a round, in the order the loop emits them -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundStarted(Event):
    """Clients selected; the instruction is about to go out. A round below quorum starts again (attempt + 1)."""

    round: int
    attempt: int
    selected: tuple[str, ...]
    deadline: float  # time.time() by which updates must arrive (the instruction's deadline)
    waiting_since: float  # monotonic: when this attempt began waiting for eligible clients (== at if it did not)


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstructionPublished(Event):
    round: int
    attempt: int
    bytes_down: int  # what the selected clients download together


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateAccepted(Event):
    """An update passed every check and is folded into the aggregate.

    The stage stamps split its cost: received_at (taken from the transport) -> validated_at (decoded, verified,
    validated) -> aggregated_at (folded into the strategy) -> at (folded into the aggregation-error meter)."""

    round: int
    node: str
    num_examples: int
    bytes: int
    metrics: dict[str, Any]
    received_at: float
    validated_at: float
    aggregated_at: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateRejected(Event):
    """A message dropped by a rule. `round` is the round open when it arrived (None between rounds)."""

    round: int | None
    topic: str
    node: str | None  # the node its topic names, if any
    reason: RejectReason
    detail: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdatesCollected(Event):
    """Collection closed: everyone selected answered or was refused (a reject notice), or the deadline passed."""

    round: int
    attempt: int
    accepted: int
    rejected: int
    quorum_met: bool  # False: the round starts again with a fresh selection (or fails after the last attempt)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Aggregated(Event):
    round: int
    participants: int
    num_examples: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluated(Event):
    round: int
    evaluation: dict[str, Any] | None  # {"accuracy", "loss", ...}; None without evaluation data


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSaved(Event):
    """state.json names this round: from here on a crash resumes after it."""

    round: int
    adapter_dir: Path
    started_at: float  # monotonic: when the save began (the round record was complete)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundEnded(Event):
    """The round is checkpointed; its result is published right after the subscribers return."""

    round: int
    record: RoundRecord
    report: RunReport  # the run so far, this round included


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultPublished(Event):
    round: int
    started_at: float  # monotonic: when publishing began (every RoundEnded subscriber had returned)


# -- the bus ----------------------------------------------------------------------------------------------------------
@functools.cache
def handler_name(event_type: type[Event]) -> str:
    """RoundEnded -> "on_round_ended": the method an object subscriber defines to receive it."""
    return "on_" + re.sub(r"(?<!^)(?=[A-Z])", "_", event_type.__name__).lower()


@dataclasses.dataclass
class _Subscription:
    subscriber: Any
    required: bool
    handles: frozenset[str]  # its on_<event> methods; empty: a callable that takes every event
    failures: int = 0

    def handler(self, name: str) -> Callable[[Event], Any] | None:
        if not self.handles:
            return self.subscriber
        return getattr(self.subscriber, name) if name in self.handles else None


class EventBus:
    """Delivers each event to every subscriber, in subscription order, on the emitting thread."""

    def __init__(self) -> None:
        self._subscriptions: list[_Subscription] = []

    @property
    def subscribers(self) -> list[Any]:
        return [s.subscriber for s in self._subscriptions]

    def subscribe(self, subscriber: Callable[[Event], Any] | object, *, required: bool = False) -> Any:
        """Add a subscriber (a callable, or an object with `on_<event>` methods); returns it, for unsubscribe.

        `required`: its errors propagate (and stop the run) instead of being logged."""
        handles = frozenset(n for n in dir(subscriber) if n.startswith("on_") and callable(getattr(subscriber, n)))
        if not handles and not callable(subscriber):
            raise TypeError(f"{subscriber!r} is neither callable nor has on_<event> methods")
        self._subscriptions.append(_Subscription(subscriber, required, handles))
        return subscriber

    def unsubscribe(self, subscriber: Any) -> None:
        self._subscriptions = [s for s in self._subscriptions if s.subscriber is not subscriber]

    def emit(self, event: Event) -> None:
        name = handler_name(type(event))
        for subscription in list(self._subscriptions):
            handler = subscription.handler(name)
            if handler is None:
                continue  # an object subscriber that does not handle this event
            try:
                handler(event)
            except Exception:
                if subscription.required:
                    raise
                subscription.failures += 1
                # The traceback once per subscriber, then one line each time: a broken tracker must not flood.
                log.warning(
                    "subscriber %r failed on %s (failure %d); the round goes on",
                    subscription.subscriber,
                    type(event).__name__,
                    subscription.failures,
                    exc_info=subscription.failures == 1,
                )
