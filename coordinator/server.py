"""The coordinator's round loop (one template method, `run`), with resume from the last checkpoint.

Per round: wait for enough online clients, select, publish the instruction with the global
adapter (retained, so a client that reconnects mid-round still gets it), accept updates until
everyone selected answered or the deadline passed, aggregate if the quorum was met (else retry
with a fresh selection), evaluate, checkpoint atomically, publish the round result.

Whatever only observes the run (report.json, metrics.png, the live view, trackers) subscribes to the
events the loop emits (coordinator/events.py); the checkpoint stays a built-in step, before the round's
result is published or any subscriber hears of it.

Two halves live beside it, mixed into `Coordinator`: coordinator/lifecycle.py (start, resume, what is published
between rounds) and coordinator/update_intake.py (taking a round's updates, answering refused ones).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from coordinator.checkpoint import CheckpointStore
from coordinator.config import CoordinatorConfig
from coordinator.eligibility import Eligibility, summarize
from coordinator.evaluation import Evaluator
from coordinator.events import (
    Aggregated,
    CheckpointSaved,
    Evaluated,
    EventBus,
    InstructionPublished,
    ResultPublished,
    RoundEnded,
    RoundStarted,
    RunFailed,
    RunFinished,
    RunStarted,
    UpdatesCollected,
)
from coordinator.intake import EarlyUpdates
from coordinator.lifecycle import RunLifecycle, pct
from coordinator.live_view import RoundView
from coordinator.objective import local_work_settings, objective_settings, protocol_needed
from coordinator.other_runs import OtherRuns
from coordinator.outputs import MetricsPlot, ReportWriter
from coordinator.presence import PresenceCheck
from coordinator.registry import MAX_STATUS_BYTES, NodeInfo, Registry, Requirements, checked_selection
from coordinator.signatures import Authenticator
from coordinator.update_intake import UpdateIntake
from coordinator.weighting import round_update_metrics
from flora import __version__
from flora.algorithms import AggregationErrorMeter, Strategy, Tensors
from flora.errors import FloraError, ProtocolError, RejectReason
from flora.modeling.fingerprint import model_fingerprint
from flora.modeling.recipes import get_recipe
from flora.modeling.training_info import TrainingInfo
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_from_bytes
from flora.protocol.topics import run_of_status_topic
from flora.records import RoundRecord, RunReport
from flora.throttled_log import ThrottledLog
from flora.transport import Message, Transport
from flora.transport.base import RECONNECTED

log = logging.getLogger(__name__)
drops = ThrottledLog(__name__)  # rejections: a flood of them must not flood the log


EXPLAINED_LINES = 500  # "node X cannot take part" lines logged in full per run (a fleet's worth), then throttled


class RoundFailed(FloraError):
    """A round stayed below quorum for every allowed attempt. The checkpoint is intact; rerun to resume."""


class Coordinator(RunLifecycle, UpdateIntake):
    def __init__(
        self,
        config: CoordinatorConfig,
        transport: Transport,
        evaluator: Evaluator,
        strategy: Strategy,
        subscribers: Iterable[Any] = (),
    ):
        """`subscribers` (callables or objects with on_<event> methods, see coordinator/events.py) follow the run
        after the built-in outputs: report.json and global_adapter/, metrics.png, the live view."""
        self.config = config
        self.transport = transport
        self.evaluator = evaluator
        self.strategy = strategy
        self.topics = Topics(config.run_id)
        self.requirements = Requirements(config.min_client_memory_mb, config.require_4bit)
        needs_minor, needs_because = protocol_needed(config.local_epochs, config.client_optimizer)
        self.eligibility = Eligibility(
            run_id=config.run_id,
            recipe=config.recipe,
            rank=get_recipe(config.recipe).rank,
            accepts_lower_rank=strategy.accepts_lower_rank,
            fingerprint=model_fingerprint(config.model),
            model=config.model,
            requirements=self.requirements,
            needs_minor=needs_minor,
            needs_because=needs_because,
        )
        self.checkpoints = CheckpointStore(config.checkpoint_dir)
        self.auth = Authenticator(config)  # signs what we publish; verifies devices (when keys are configured)
        self.registry = Registry(is_known=self.auth.knows)  # bounded: unknown nodes are capped and evicted
        self.presence = PresenceCheck(self.registry, config.presence_timeout_s)  # re-learns who is online
        self.other_runs = OtherRuns(config.run_id)  # devices announcing under another run id, to name them
        self.rejections: collections.Counter[str] = collections.Counter()
        self.history: list[RoundRecord] = []
        self.initial: dict[str, Any] | None = None
        self.global_tensors: Tensors = {}
        self.next_round = 1
        self._started = False
        self._instruction: Message | None = None  # the open round's, re-published after a reconnect
        self._early = EarlyUpdates()  # updates for the next round that arrived before it opened
        self._open_round: int | None = None  # the round collecting updates, for UpdateRejected
        self._resent_between_rounds = 0  # recovery re-sends that came while no round was open
        self._echoes = 0  # our own statuses received back (start's barrier)
        self._probing = False
        self._explained = 0  # "cannot take part" lines logged
        self._retained_result: Envelope | None = None  # a round result of this run id found on the broker at start
        self.events = EventBus()
        out = Path(config.output_dir)
        self.training = TrainingInfo(
            prompt_template=config.prompt_template,
            class_names=tuple(evaluator.data.class_names) if evaluator.data is not None else None,
            run_id=config.run_id,
            recipe=config.recipe,
        )
        writer = ReportWriter(out, evaluator.model, base_model=config.model, training=self.training)
        self.events.subscribe(writer, required=True)
        self.events.subscribe(MetricsPlot(out / "metrics.png"))
        self.events.subscribe(RoundView(config.run_id, config.rounds))
        for subscriber in subscribers:
            self.events.subscribe(subscriber)

    # -- setup and resume ----------------------------------------------------------------
    # -- the template method -------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every remaining round; returns the report as JSON-able values (RunReport.to_dict())."""
        self.start()
        try:
            self.events.emit(
                RunStarted(
                    run_id=self.config.run_id,
                    first_round=self.next_round,
                    rounds_total=self.config.rounds,
                    report=self.report(),
                    config=_public_settings(self.config),
                )
            )
            if self.history:  # resumed: the last round's outputs and result may not have been written
                self._republish_last_round()
            while self.next_round <= self.config.rounds:
                self.run_round(self.next_round)
                self.next_round += 1
            self._publish_finished()
            report = self.report()
            self.events.emit(RunFinished(report=report))
            return report.to_dict()
        except BaseException as exc:
            if self.transport.connected:  # a clean disconnect sends no Will: say it ourselves
                self.transport.publish(self._coordinator_status("offline"), timeout=5)
            self.events.emit(RunFailed(round=self.next_round, error=f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            self.transport.close()

    def run_round(self, round_: int) -> RoundRecord:
        started = time.monotonic()
        for attempt in range(1, self.config.max_round_attempts + 1):
            waiting_since = time.monotonic()
            inflight = self.checkpoints.load_inflight(round_) if attempt == 1 else None
            if inflight is not None:
                # We crashed during this round: keep its selection, so the updates the broker queued
                # for us while we were down (persistent session, QoS 1) are still valid.
                selected = inflight["selected"]
                log.info("resuming round %d with its original selection %s", round_, selected)
            else:
                self._wait_for_clients()
                seed = self.config.seed * 100_003 + round_ * 101 + attempt
                candidates = self.registry.candidates(why_not=self._why_not)
                default = self.registry.sample(
                    candidates,
                    fraction=self.config.clients_per_round_fraction,
                    minimum=self.config.min_clients_per_round,
                    seed=seed,
                )
                chosen = self.strategy.select(candidates, round_=round_, rng_seed=seed, default=default)
                selected = checked_selection(chosen, candidates, self.strategy.name)
                self.checkpoints.save_inflight(round_, selected)
            self.events.emit(
                RoundStarted(
                    round=round_,
                    attempt=attempt,
                    selected=tuple(selected),
                    deadline=time.time() + self.config.round_deadline_s,
                    waiting_since=waiting_since,
                )
            )
            bytes_down = self._publish_instruction(round_, selected)
            self.events.emit(InstructionPublished(round=round_, attempt=attempt, bytes_down=bytes_down))
            collected = self._collect(round_, set(selected))
            updates, rejected, bytes_up = list(collected.accepted.values()), collected.rejected, collected.bytes_up
            quorum_met = len(updates) >= self.config.quorum
            self.events.emit(
                UpdatesCollected(
                    round=round_,
                    attempt=attempt,
                    accepted=len(updates),
                    rejected=sum(rejected.values()),
                    quorum_met=quorum_met,
                )
            )
            if quorum_met:
                break
            log.warning(
                "round %d attempt %d: %d of %d selected answered, below quorum %d; retrying with a fresh selection",
                round_,
                attempt,
                len(updates),
                len(selected),
                self.config.quorum,
            )
        else:
            raise RoundFailed(
                f"round {round_} stayed below quorum {self.config.quorum} for {self.config.max_round_attempts} "
                "attempts; check that clients are online, then rerun the same command to resume"
            )
        self.global_tensors = self.strategy.aggregate()
        total_examples = sum(u.num_examples for u in updates)
        self.events.emit(Aggregated(round=round_, participants=len(updates), num_examples=total_examples))
        evaluation = self.evaluator.evaluate(self.global_tensors)
        self.events.emit(Evaluated(round=round_, evaluation=evaluation))
        record = RoundRecord(
            round=round_,
            rounds_total=self.config.rounds,
            attempts=attempt,
            selected=len(selected),
            participants=len(updates),
            accepted=tuple(sorted(u.node for u in updates)),
            rejected=dict(rejected),
            accuracy=evaluation["accuracy"] if evaluation else None,
            loss=evaluation["loss"] if evaluation else None,
            num_examples=total_examples,
            **round_update_metrics(updates),  # train_loss, client_peak_memory_mb, weights_capped
            aggregation_error=self.error_meter.error(),
            strategy_metrics=dict(self.strategy.round_metrics()),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            seconds=time.monotonic() - started,
            resent=collected.resent + self._resent_between_rounds,
        )
        self._resent_between_rounds = 0
        self.history.append(record)
        checkpoint_started = time.monotonic()
        adapter_dir = self._checkpoint(round_)
        # Only now may anyone hear of the round: state.json names it, so a crash from here on resumes after it.
        self.events.emit(CheckpointSaved(round=round_, adapter_dir=adapter_dir, started_at=checkpoint_started))
        self.events.emit(RoundEnded(round=round_, record=record, report=self.report()))
        publish_started = time.monotonic()
        self._publish_result(round_, record)
        self.events.emit(ResultPublished(round=round_, started_at=publish_started))
        log.info(
            "round %d: %d/%d updates, accuracy %s, up %d B, down %d B, %.1fs",
            round_,
            len(updates),
            len(selected),
            pct(evaluation),
            bytes_up,
            bytes_down,
            record.seconds,
        )
        return record

    # -- round steps ---------------------------------------------------------------------
    def _pump(self, timeout: float) -> Message | None:
        """Receive one message; status messages update the registry and are consumed here."""
        message = self.transport.receive(timeout=timeout)
        self.presence.expire_due()
        if message is not None and message.topic == RECONNECTED:
            self._announce_after_reconnect()
            return None
        if message is not None and not message.payload:
            return None  # a cleared retained topic, not a message
        if message is not None and message.topic == self.topics.metrics:
            self._note_result(message)
            return None
        if message is None or "/status/" not in message.topic:
            return message
        topic_run = run_of_status_topic(message.topic)
        if topic_run is not None and topic_run != self.config.run_id:
            self._other_run_status(message, topic_run)
            return None
        if len(message.payload) > MAX_STATUS_BYTES:  # before it is parsed: the registry keeps what it holds
            drops.warning("status size", "dropped a %d-byte status on %s", len(message.payload), message.topic)
            return None
        try:
            env = envelope_from_bytes(message.payload)
        except ProtocolError as exc:
            if exc.reason is RejectReason.VERSION:  # a client on another major version: count it, say it loudly
                self._count_rejection(exc, message.topic, collections.Counter())
            else:
                log.warning("dropped status on %s: %s", message.topic, exc)
            return None
        if env.sender != Topics.node_of(message.topic):
            log.warning("dropped status: %s published on %s", env.sender, message.topic)
            return None
        if env.run == self.config.run_id and env.sender != self.config.node_id and env.kind == "status":
            if not self.auth.status_ok(message.payload, env):
                return None
            info = self.registry.update(env.sender, env.data, protocol=env.version)
            self.other_runs.joined(env.sender)
            answers = env.data.get("answers") if isinstance(env.data, dict) else None
            self.presence.heard(env.sender, retained=message.retain, answers=answers)
            log.debug("node %s is %s", env.sender, info.state)
            self._explain_eligibility(info)
        elif env.run == self.config.run_id and env.sender == self.config.node_id:
            self._echoes += 1  # our own status came back: everything the broker queued before it has arrived
        return None

    def _other_run_status(self, message: Message, topic_run: str) -> None:
        """A status under another run id: only remembered to name the device if this run lacks clients."""
        if len(message.payload) > MAX_STATUS_BYTES:
            return
        try:
            env = envelope_from_bytes(message.payload)
        except ProtocolError:
            return  # not ours to judge: another run's coordinator counts it
        if env.kind == "status" and env.run == topic_run and env.sender == Topics.node_of(message.topic):
            self.other_runs.heard(env)

    def _explain_eligibility(self, info: NodeInfo) -> None:
        """Log, once per change, that an online node cannot take part and why (and when it can again)."""
        why = self._why_not(info) if info.state == "online" else None
        if why == info.ineligible:
            return
        if why is not None:
            # Each node once per change of reason; past EXPLAINED_LINES (an open broker's flood of made-up nodes
            # flipping their fields) one line per interval, the rest counted.
            self._explained += 1
            line = "node %s is online but cannot take part in run %s: %s"
            if self._explained <= EXPLAINED_LINES:
                log.warning(line, info.node, self.config.run_id, why)
            else:
                drops.warning("ineligible", line, info.node, self.config.run_id, why)
        elif info.ineligible is not None and info.state == "online":
            log.info("node %s can take part in run %s now", info.node, self.config.run_id)
        info.ineligible = why

    def _why_not(self, info: NodeInfo) -> str | None:
        return self.eligibility.why_not(info, self.next_round)

    def _wait_for_clients(self) -> None:
        deadline = time.monotonic() + self.config.wait_for_clients_s
        needed = self.config.min_available_clients
        while len(self.registry.online(why_not=self._why_not)) < needed:
            if time.monotonic() > deadline:
                eligible = len(self.registry.online(why_not=self._why_not))
                refused = self.registry.ineligible(self._why_not)
                also = f"; online but not eligible: {summarize(refused)}" if refused else ""
                if self.other_runs.nodes:
                    also += (
                        f"; online under another run id: {self.other_runs.summary()} (set run_id = "
                        f"{self.config.run_id!r} in the client config of those that belong to this run)"
                    )
                raise RoundFailed(
                    f"only {eligible} of {needed} required eligible clients came online "
                    f"within {self.config.wait_for_clients_s:.0f}s{also}; start more clients, fix the ones named, "
                    "or lower min_available_clients"
                )
            message = self._pump(0.2)
            if message is not None:  # an update while no round is open
                self._hold_or_reject(message)

    def _publish_instruction(self, round_: int, selected: list[str]) -> int:
        settings = self.strategy.configure_train(
            round_,
            {
                **local_work_settings(self.config.local_epochs, self.config.client_optimizer),
                "learning_rate": self.config.learning_rate,
                "weight_decay": self.config.weight_decay,
                "batch_size": self.config.batch_size,
                "prompt_template": self.config.prompt_template,
                **objective_settings(
                    self.config.objective,
                    self.config.class_names or self.training.class_names,
                    self.config.prompt_template,
                    self.config.logit_calibration,
                ),
            },
        )
        self.strategy.begin(round_, self.global_tensors)
        self.error_meter = AggregationErrorMeter(self.global_tensors)
        body, meta = adapter_to_body(self.global_tensors, self.config.wire_encoding, self.config.wire_compression)
        env = Envelope(
            kind="train",
            run=self.config.run_id,
            sender=self.config.node_id,
            round=round_,
            data={
                "selected": selected,
                "deadline": time.time() + self.config.round_deadline_s,
                "recipe": self.config.recipe,
                "rank": self.eligibility.rank,  # 1.2: rank, lower_rank_ok and model_fingerprint let a client
                "lower_rank_ok": self.eligibility.accepts_lower_rank,  # that cannot take part say why (§5.2)
                **({"model_fingerprint": self.eligibility.fingerprint} if self.eligibility.fingerprint else {}),
                "train": settings,
            },
            body=body,
            body_meta=meta,
        )
        self.auth.instruction_published(round_, env.msg_id)
        payload = self.auth.seal(env)
        self._instruction = Message(self.topics.instruction, payload, qos=1, retain=True)
        self.transport.publish(self._instruction)
        return len(payload) * len(selected)  # what the selected clients download

    # -- the report ----------------------------------------------------------------------
    def report(self) -> RunReport:
        return RunReport(
            run_id=self.config.run_id,
            toolkit_version=__version__,
            model=self.config.model,
            recipe=self.config.recipe,
            strategy=self.strategy.describe(),  # what ran: name, params, wrappers, hooks
            rounds_planned=self.config.rounds,
            initial=self.initial,
            rounds=tuple(self.history),
            rejections=dict(self.rejections),
            extras={"training": self.training.to_dict()},  # the prompt export and infer should use
        )


def _public_settings(config: CoordinatorConfig) -> dict[str, Any]:
    """The settings as JSON-able values for trackers (RunStarted), without the broker password."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "password":
            continue
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out
