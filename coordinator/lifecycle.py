"""The coordinator's run lifecycle: start (checks, resume or a fresh run), and what it tells the world between
rounds: its status, the round result, the end of the run. Split from coordinator/server.py (the round loop):
`RunLifecycle` is mixed into `Coordinator`, whose state it uses.

A resumed run re-publishes its last round (outputs and result), because a kill after state.json named the round
may have come before either; a fresh run refuses a run id whose result the broker still keeps (its clients would
ignore the rounds they believe done).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.events import RunResumed
from flora import __version__
from flora.errors import ConfigError, ProtocolError
from flora.files import check_writable, prune_partial
from flora.protocol import Envelope, envelope_from_bytes
from flora.protocol.signing import verify
from flora.protocol.topics import ALL_RUNS_STATUS
from flora.records import RoundRecord
from flora.transport import Message

log = logging.getLogger("coordinator.server")

START_PROBE_S = 5.0  # at most this long at start to read what the broker keeps of this run id


class RunLifecycle:
    def _coordinator_status(self, state: str) -> Message:
        env = Envelope(
            kind="status",
            run=self.config.run_id,
            sender=self.config.node_id,
            data={"state": state, "role": "coordinator", "round": self.history[-1].round if self.history else 0},
        )
        return Message(self.topics.status(self.config.node_id), self.auth.seal(env), retain=True)

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        # Before anything waits for a fleet: a directory we cannot write would otherwise show only when the
        # first round is due to be checkpointed.
        check_writable(self.config.checkpoint_dir, f"checkpoint_dir {self.config.checkpoint_dir}")
        check_writable(self.config.output_dir, f"output_dir {self.config.output_dir}")
        for leftover in [*self.checkpoints.prune_leftovers(), *prune_partial(self.config.output_dir)]:
            log.info("removed %s, left by a write that was interrupted", leftover)
        # Checkpoint first, broker second: the Last Will registered at connect then names the right round.
        saved = self.checkpoints.load()
        if saved is None:
            self.global_tensors = self.evaluator.initial_adapter()
            self.initial = self.evaluator.evaluate(self.global_tensors)
            log.info("fresh run %s; initial accuracy %s", self.config.run_id, pct(self.initial))
        else:
            self._resume(saved)
        self.transport.connect(will=self._coordinator_status("offline"))
        self.transport.subscribe(self.topics.all_status, qos=1)
        self.transport.subscribe(ALL_RUNS_STATUS, qos=1)  # devices configured with another run id (other_runs.py)
        self.transport.subscribe(self.topics.all_updates, qos=1)
        if self.next_round <= self.config.rounds:
            # A run extended after it finished (more rounds) must not leave clients reading "finished".
            self.transport.publish(Message(self.topics.instruction, b"", retain=True))
        if saved is None:
            self._refuse_a_used_run_id()
            # a fresh run on a broker where no result of this run id is kept: clear any empty leftover
            self.transport.publish(Message(self.topics.metrics, b"", retain=True))
        self.transport.publish(self._coordinator_status("online"))
        # Clients that announced before we subscribed are found even where retained statuses do not reach a
        # wildcard subscription (RabbitMQ). Only discovery: a retained status is still believed at start, as a
        # 1.0/1.1 client that announces once and never answers a presence request must still be found.
        self._ask_presence("coordinator started", check=False)

    def _ask_presence(self, why: str, *, check: bool = True) -> None:
        """Ask every client of the run for a fresh status; with `check`, those that stay silent are counted
        offline after presence_timeout_s (coordinator/presence.py)."""
        env = Envelope(
            kind="presence",
            run=self.config.run_id,
            sender=self.config.node_id,
            data={"reply_within_s": self.config.presence_timeout_s},
        )
        if check:
            self.presence.begin(env.msg_id, why)
        self.transport.publish(Message(self.topics.presence, self.auth.seal(env), qos=1))

    def _refuse_a_used_run_id(self) -> None:
        """A fresh coordinator (no checkpoint) whose run id already has a round result on the broker would find
        its clients ignoring rounds 1..N as already trained, and wait for them forever: refuse to start instead.
        The retained round result is read by subscribing to it, then publishing our status and waiting for it
        to come back: the broker delivers what it retained for the subscription before it."""
        self.transport.subscribe(self.topics.metrics, qos=1)
        self._probing = True
        try:
            self.transport.publish(self._coordinator_status("online"))
            deadline = time.monotonic() + START_PROBE_S
            while self._echoes == 0 and self._retained_result is None and time.monotonic() < deadline:
                message = self._pump(0.1)
                if message is not None:  # an update queued for us: held for round 1 or counted
                    self._hold_or_reject(message)
        finally:
            self._probing = False
        found = self._retained_result
        if found is not None:
            raise ConfigError(
                f"run_id {self.config.run_id!r} was used before: the broker keeps its result for round {found.round}, "
                f"but checkpoint_dir {self.config.checkpoint_dir} has no checkpoint of it, and clients that trained "
                f"it ignore rounds 1 to {found.round}. Start a new run with another run_id, or set checkpoint_dir "
                "to that run's checkpoint to resume it (to reuse the id anyway, clear the retained result: "
                f"mosquitto_pub -r -n -t {self.topics.metrics}, and the clients' state_dir)"
            )

    def _note_result(self, message: Message) -> None:
        """A message on our round-result topic: only the retained one found while starting matters."""
        if not self._probing:
            return  # our own results coming back
        try:
            env = envelope_from_bytes(message.payload)
        except ProtocolError:
            return
        if env.kind != "round_result" or env.run != self.config.run_id or not isinstance(env.round, int):
            return
        if env.round < 1:
            return  # no round was completed: nothing a client would refuse
        signer = self.auth.signer
        if signer is not None:  # with a signing key, only a result we signed proves the id was used
            try:
                verify(message.payload, signer.public_key, signer="this coordinator")
            except ProtocolError:
                log.warning("ignored a round result on %s that this coordinator did not sign", message.topic)
                return
        self._retained_result = env

    def _resume(self, saved: dict[str, Any]) -> None:
        from safetensors.numpy import load_file

        self.global_tensors = load_file(str(Path(saved["adapter_dir"]) / "adapter_model.safetensors"))
        self.global_tensors = {k: v.astype(np.float32) for k, v in self.global_tensors.items()}
        self.evaluator.load(self.global_tensors)
        self.history = [RoundRecord.from_dict(r) for r in saved.get("history", [])]
        self.initial = saved.get("initial")
        self.rejections.update(saved.get("rejections", {}))
        self.strategy.load_state_dict(self.checkpoints.load_strategy_state(saved))
        self.next_round = int(saved["round"]) + 1
        log.info("resumed run %s after round %d", self.config.run_id, saved["round"])

    def _republish_last_round(self) -> None:
        """After a resume: write the last checkpointed round's outputs and publish its result again. A kill after
        state.json named the round may have come before either; both are idempotent, so they are always redone
        (a resumed finished run then leaves outputs equal to its last checkpoint, result and finished published)."""
        record = self.history[-1]
        self.events.emit(RunResumed(round=record.round, record=record, report=self.report()))
        self._publish_result(record.round, record)

    def _announce_after_reconnect(self) -> None:
        """After a broker restart: say we are online again, re-publish the open round's instruction (a broker
        without persistence has forgotten the retained copy), and re-learn who is online: the statuses from
        before the outage may be stale (a broker without persistence lost the Wills of nodes that died)."""
        self.transport.publish(self._coordinator_status("online"))
        if self._instruction is not None:
            self.transport.publish(self._instruction)
        self._ask_presence("reconnected to the broker")

    def _checkpoint(self, round_: int) -> Path:
        """The round's adapter and state, atomically; returns the adapter directory."""
        self.evaluator.load(self.global_tensors)
        state = {
            "run_id": self.config.run_id,
            "history": [r.to_dict() for r in self.history],
            "initial": self.initial,
            "rejections": dict(self.rejections),
            "registry": self.registry.snapshot(),
            "toolkit_version": __version__,
        }
        return self.checkpoints.save(
            round_, self.evaluator.model, state, base_model=self.config.model, strategy_state=self.strategy.state_dict()
        )

    def _publish_result(self, round_: int, record: RoundRecord) -> None:
        env = Envelope(
            kind="round_result",
            run=self.config.run_id,
            sender=self.config.node_id,
            round=round_,
            data=record.to_dict(),
        )
        self.transport.publish(Message(self.topics.metrics, self.auth.seal(env), retain=True))

    def _publish_finished(self) -> None:
        env = Envelope(
            kind="finished",
            run=self.config.run_id,
            sender=self.config.node_id,
            round=self.config.rounds,
            data={"rounds": self.config.rounds},
        )
        payload = self.auth.seal(env)
        # Replace the retained instruction so late joiners learn the run is over, not a stale round; it is also
        # what a reconnect re-publishes from now on.
        self._instruction = Message(self.topics.instruction, payload, retain=True)
        self.transport.publish(self._instruction)
        self.transport.publish(self._coordinator_status("finished"))


def pct(evaluation: dict[str, Any] | None) -> str:
    return "n/a" if not evaluation else f"{evaluation['accuracy'] * 100:.1f}%"
