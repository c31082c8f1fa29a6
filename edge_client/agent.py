"""The edge agent's lifecycle: announce, wait for instructions, train, return the adapter update.

    connect (Last Will: offline) -> retained status "online" with capabilities
    loop: instruction for a round we were selected for -> train -> publish update (QoS 1)
          round result naming us as accepted -> drop the pending update
          run finished -> idle (or exit, if configured)

A malformed or foreign message is logged and dropped; the agent keeps running. Every message's `data` is
checked against its schema (flora/protocol/schema.py) before it is read, and `handle` never raises: a
retained message that crashed the agent would come back on every restart. Without the coordinator's key an
instruction is believed only up to `max_round_ahead` rounds past the highest round seen, so one forged
far-ahead round cannot make the device refuse the genuine rounds before it. Training happens on the main
thread; paho's network thread keeps the connection alive meanwhile.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from edge_client.capabilities import detect_capabilities
from edge_client.config import ClientConfig
from edge_client.health import read_health
from edge_client.identity import DeviceIdentity
from edge_client.presence import PresenceReplies
from edge_client.state import StateStore
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.algorithms import LocalDP
from flora.errors import ConfigError, ProtocolError, RejectReason, StorageError
from flora.modeling.adapter import adapter_parameters
from flora.modeling.fingerprint import model_fingerprint
from flora.modeling.lora_factors import fit_to_rank
from flora.protocol import (
    Envelope,
    Topics,
    adapter_from_body,
    adapter_to_body,
    envelope_from_bytes,
)
from flora.protocol.schema import check_data
from flora.protocol.signing import Signer, load_public_key, seal, verify
from flora.protocol.wire_settings import adapter_size_problem
from flora.transport import Message, Transport
from flora.transport.base import RECONNECTED

log = logging.getLogger(__name__)


class EdgeAgent:
    def __init__(self, config: ClientConfig, transport: Transport, trainer: LocalTrainer):
        self.config = config
        self.transport = transport
        self.trainer = trainer
        self.topics = Topics(config.run_id)
        self.store = StateStore(config.state_dir)
        self.state = self.store.load(config.run_id)
        self.finished = False
        self.rounds_trained = 0
        self.round_seen = -1  # the highest round of an instruction or round result believed so far
        self._held: Envelope | None = None  # an unsigned instruction too far ahead, until a round result catches up
        # End-to-end integrity (optional): sign what we send; act only on what the coordinator signed.
        self.signer = Signer.from_file(config.signing_key) if config.signing_key else None
        self.coordinator_key = load_public_key(config.coordinator_public_key) if config.coordinator_public_key else None
        # The device's own client hooks, run after the instruction's: local DP is set here, not by the coordinator.
        local_dp = LocalDP.from_settings(config.dp_clip_norm, config.dp_noise_multiplier)
        self.local_hooks = (local_dp,) if local_dp is not None else ()
        self.presence = PresenceReplies()  # answers to presence requests, rate-limited
        # 1.2: announced in the status, so the coordinator can say why it cannot use this device (§5.1a).
        self.instance = uuid.uuid4().hex[:12]  # this process: a second device with our node_id has another one
        self.rank = int(self.trainer.recipe.rank)
        problem = adapter_size_problem(
            adapter_parameters(self.trainer.model), encoding=config.wire_encoding, recipe=config.recipe
        )
        if problem:  # the coordinator would refuse every update: say so before joining
            raise ConfigError(problem)
        self.fingerprint = model_fingerprint(config.model)
        self.identity = DeviceIdentity(config.node_id, self.instance)
        self._told: set[tuple] = set()  # mismatches already logged: each is said once, not per retained copy

    # -- messages we send ---------------------------------------------------------------
    def _status(self, state: str) -> Message:
        data: dict[str, Any] = {
            "state": state,
            "last_round_trained": self.state.last_round_trained,
            "instance": self.instance,
        }
        if state != "offline":
            data["capabilities"] = detect_capabilities(
                self.trainer.clip.device,
                self.trainer.num_examples,
                self.trainer.clip.quantization,  # in effect, after any fallback
                configured_quantization=self.config.quantization,
            )
            data["recipe"] = self.config.recipe
            data["rank"] = self.rank
            if self.fingerprint is not None:
                data["model_fingerprint"] = self.fingerprint
            data["health"] = read_health(self.config.state_dir, cuda_device=self.trainer.clip.device)
            if self.presence.last_request is not None:
                data["answers"] = self.presence.last_request
        env = Envelope(kind="status", run=self.config.run_id, sender=self.config.node_id, data=data)
        return Message(self.topics.status(self.config.node_id), seal(env, self.signer), qos=1, retain=True)

    def _announce(self) -> None:
        """Publish our status "online" (it also answers any presence request received before it)."""
        self.transport.publish(self._status("online"))
        self.presence.answered()

    def answer_presence_if_due(self) -> None:
        """Answer presence requests, at most once per PresenceReplies interval (later ones are folded)."""
        if self.presence.take():
            self._announce()

    def start(self) -> None:
        self.transport.connect(will=self._status("offline"))
        # Round results first: their retained copy tells how far the run is before the retained instruction arrives.
        self.transport.subscribe(self.topics.metrics, qos=1)
        self.transport.subscribe(self.topics.instruction, qos=1)
        self.transport.subscribe(self.topics.presence, qos=1)  # 1.2: "publish your status now"
        self.transport.subscribe(self.topics.notice(self.config.node_id), qos=1)  # 1.2: why an update was refused
        self.transport.subscribe(self.topics.status(self.config.node_id), qos=1)  # 1.2: another device with our id?
        self._announce()
        log.info(
            "%s online in run %s with %d local examples",
            self.config.node_id,
            self.config.run_id,
            self.trainer.num_examples,
        )

    def stop(self) -> None:
        try:
            if self.transport.connected:
                self.transport.publish(self._status("offline"), timeout=5)
        finally:
            self.transport.close()

    # -- main loop ------------------------------------------------------------------------
    def run(self, *, max_seconds: float | None = None) -> None:
        self.start()
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        next_status = time.monotonic() + self.config.status_interval_s
        try:
            while not (self.finished and self.config.exit_when_finished):
                if deadline is not None and time.monotonic() > deadline:
                    break
                if time.monotonic() >= next_status:  # health and last round, fresh for status views
                    self._announce()
                    next_status = time.monotonic() + self.config.status_interval_s
                self.answer_presence_if_due()
                message = self.transport.receive(timeout=0.5)
                if message is not None:
                    self.handle(message)
        finally:
            self.stop()

    def handle(self, message: Message) -> None:
        """Act on one received message. Never raises for a message's sake (only StorageError, for our own disk): the
        specific checks name what is wrong, and anything
        they missed is logged here, so no message can stop the agent (or crash-loop it when retained)."""
        try:
            self._handle(message)
        except StorageError:
            raise  # our own disk, not the message: stop (the CLI prints the path and the fix) rather than run on
        except Exception as exc:  # the last line of defence, after the schema and signature checks
            log.error(
                "dropped the message on %s: acting on it failed with %s: %s; the agent keeps running",
                message.topic,
                type(exc).__name__,
                exc,
                exc_info=True,
            )

    def _handle(self, message: Message) -> None:
        if message.topic == RECONNECTED:
            self.identity.reconnected()
            self._announce()  # our Will may have fired meanwhile
            return
        if message.topic == self.topics.status(self.config.node_id):
            self.identity.saw_status(message.payload)
            return
        if not message.payload:
            return  # a cleared retained topic
        try:
            env = envelope_from_bytes(message.payload)
        except ProtocolError as exc:
            if exc.reason is RejectReason.VERSION:  # no retry can fix this: an operator must upgrade one side
                log.error("cannot take part: the message on %s is refused: %s", message.topic, exc)
            else:
                log.warning("dropped message on %s: %s", message.topic, exc)
            return
        if env.run != self.config.run_id:
            log.warning("dropped %s for run %s (this agent is in run %s)", env.kind, env.run, self.config.run_id)
            return
        if env.kind in ("train", "finished") and message.topic != self.topics.instruction:
            log.warning("dropped %s published on %s, not the instruction topic", env.kind, message.topic)
            return
        if env.kind == "reject" and message.topic != self.topics.notice(self.config.node_id):
            log.warning("dropped a reject notice published on %s, not this device's notice topic", message.topic)
            return
        if self.coordinator_key is not None and env.kind in ("train", "finished", "round_result", "reject"):
            try:
                verify(message.payload, self.coordinator_key, signer="the coordinator")
            except ProtocolError as exc:
                log.error("refused %s for round %s on %s: %s", env.kind, env.round, message.topic, exc)
                return
        try:
            data = check_data(env.kind, env.data)
        except ProtocolError as exc:
            log.warning("dropped %s for round %s on %s: %s", env.kind, env.round, message.topic, exc)
            return
        if env.kind == "train":
            self._on_train(env, data)
        elif env.kind == "round_result" and env.round is not None:
            if self.config.node_id in data.get("accepted", ()):
                self.store.acknowledge(self.state, env.round)
            self._saw_round(env.round)
        elif env.kind == "presence":
            if message.topic != self.topics.presence:
                log.warning("dropped a presence request published on %s, not the presence topic", message.topic)
                return
            self.presence.requested(env.msg_id)
            self.answer_presence_if_due()
        elif env.kind == "reject":
            self._on_reject(env, data)
        elif env.kind == "finished":
            if not self.finished:
                log.info("run %s finished after round %s", env.run, env.round)
            self.finished = True

    def _on_reject(self, env: Envelope, data: dict[str, Any]) -> None:
        """The coordinator refused our update for a round and dropped us from it: say why, loudly, with the fix."""
        if data["node"] != self.config.node_id:
            return
        log.error(
            "round %s: the coordinator refused this device's update (%s: %s) and dropped it from the round; fix: %s",
            env.round,
            data["reason"],
            data.get("detail", "no detail"),
            data.get("fix", "see the coordinator's log"),
        )

    def _saw_round(self, round_: int) -> None:
        """A round result for `round_`: the window moves, and an instruction held for being too far ahead is
        looked at again."""
        self.round_seen = max(self.round_seen, round_)
        held, self._held = self._held, None
        if held is not None:
            self._on_train(held, check_data("train", held.data))

    def _too_far_ahead(self, round_: int) -> bool:
        """Whether an unsigned instruction for `round_` is beyond the window of the rounds seen (verified: never)."""
        if self.coordinator_key is not None:
            return False  # handle() verified it: any round the coordinator signed is genuine
        seen = max(self.round_seen, self.state.last_round_trained)
        return round_ > seen + self.config.max_round_ahead

    def _tell_once(self, key: tuple, message: str, *args: Any) -> None:
        if key not in self._told and len(self._told) < 1024:
            self._told.add(key)
            log.error(message, *args)

    def _mismatch(self, round_: int, data: dict[str, Any]) -> bool:
        """Whether this device cannot take part in the run the instruction describes; says why, once per cause.
        Checked for every instruction, selected or not: the coordinator does not select a device it cannot use,
        so checking only when selected would leave this side silent."""
        recipe = data.get("recipe")
        if recipe not in (None, self.config.recipe):
            self._tell_once(
                ("recipe", recipe),
                "cannot take part from round %d: the run uses recipe %r but this device is configured for %r; "
                "set recipe = %r in the client config",
                round_,
                recipe,
                self.config.recipe,
                recipe,
            )
            return True
        theirs = data.get("model_fingerprint")
        if theirs is not None and self.fingerprint is not None and theirs != self.fingerprint:
            self._tell_once(
                ("model", theirs),
                "cannot take part from round %d: the coordinator's base model (fingerprint %s) is not this device's "
                "model %s (fingerprint %s); install the run's checkpoint and set model to it",
                round_,
                theirs,
                self.config.model,
                self.fingerprint,
            )
            return True
        run_rank = data.get("rank")
        if run_rank is None or self.rank is None:
            return False
        if self.rank != run_rank and not (self.rank < run_rank and data.get("lower_rank_ok")):
            self._tell_once(
                ("rank", run_rank),
                "cannot take part from round %d: this device trains at LoRA rank %d, the run's rank is %d%s; set "
                "lora_rank = %d in the client config, or remove lora_rank",
                round_,
                self.rank,
                run_rank,
                "" if self.rank > run_rank else " and its strategy takes no lower rank",
                run_rank,
            )
            return True
        return False

    def _on_train(self, env: Envelope, data: dict[str, Any]) -> None:
        round_ = env.round
        if round_ is None:
            log.warning("dropped a train instruction without a round number")
            return
        if self._too_far_ahead(round_):
            seen = max(self.round_seen, self.state.last_round_trained)
            log.warning(
                "held the unsigned instruction for round %d: the highest round seen is %d and an unsigned instruction "
                "may be at most %d ahead (max_round_ahead); it is acted on if a round result catches up. A forged "
                "far-ahead round would make this device refuse every genuine round before it; set "
                "coordinator_public_key to accept signed instructions for any round",
                round_,
                seen,
                self.config.max_round_ahead,
            )
            self._held = env
            return
        self._held = None  # the instruction topic keeps one message: the newest believed one supersedes a held one
        self.round_seen = max(self.round_seen, round_)
        if self._mismatch(round_, data) or self.config.node_id not in data["selected"]:
            return
        if round_ <= self.state.last_round_trained:
            # Never train twice for one instruction; re-send the finished update if it was not acknowledged.
            pending = self.store.pending_payload() if self.state.pending_round == round_ else None
            if pending is not None:
                log.info("re-sending the update for round %d", round_)
                self._publish_update(pending)
            elif ("trained", round_) not in self._told:
                self._told.add(("trained", round_))
                log.warning(
                    "ignoring the instruction for round %d: this device already trained round %d of run %s (%s). "
                    "If the run was started again under the same run_id, give it a new run_id, or delete that file "
                    "to train again",
                    round_,
                    self.state.last_round_trained,
                    self.config.run_id,
                    self.store.state_path,
                )
            return
        # No deadline check here: device clocks drift; the coordinator decides what is late.
        try:
            settings = TrainSettings.from_instruction(data.get("train", {}))
            global_adapter = adapter_from_body(env.body, env.body_meta)
            if self.config.lora_rank is not None:
                # A lower-rank device starts from the best rank-r approximation of the global adapter.
                global_adapter = fit_to_rank(global_adapter, self.config.lora_rank)
        except (ProtocolError, ValueError, TypeError) as exc:
            log.warning("dropped instruction for round %d: %s", round_, exc)
            return
        log.info("round %d: training on %d examples", round_, self.trainer.num_examples)
        try:
            tensors, metrics = self.trainer.train_round(global_adapter, settings, round_, hooks=self.local_hooks)
        except (ProtocolError, FloatingPointError) as exc:
            log.error("round %d: local training failed: %s", round_, exc)
            return
        body, meta = adapter_to_body(tensors, self.config.wire_encoding, self.config.wire_compression)
        update = Envelope(
            kind="update",
            run=self.config.run_id,
            sender=self.config.node_id,
            round=round_,
            data={"num_examples": self.trainer.num_examples, "metrics": metrics, "in_reply_to": env.msg_id},
            body=body,
            body_meta=meta,
        )
        payload = seal(update, self.signer)
        self.store.save_pending(self.state, round_, payload)  # before sending: a reboot re-sends it
        self._publish_update(payload)
        self.rounds_trained += 1
        self._announce()  # last_round_trained moved on: say so now
        log.info(
            "round %d: sent update (%d bytes, %d step%s, loss %.4f, %.1fs)",
            round_,
            len(payload),
            metrics["steps"],
            "" if metrics["steps"] == 1 else "s",
            metrics["train_loss"],
            metrics["seconds"],
        )

    def _publish_update(self, payload: bytes) -> None:
        self.transport.publish(Message(self.topics.update(self.config.node_id), payload, qos=1))
