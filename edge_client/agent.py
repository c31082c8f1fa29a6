"""The edge agent's lifecycle: announce, wait for instructions, train, return the adapter update.

    connect (Last Will: offline) -> retained status "online" with capabilities
    loop: instruction for a round we were selected for -> train -> publish update (QoS 1)
          round result naming us as accepted -> drop the pending update
          run finished -> idle (or exit, if configured)

A malformed or foreign message is logged and dropped; the agent keeps running. Training happens
on the main thread; paho's network thread keeps the connection alive meanwhile.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edge_client.capabilities import detect_capabilities
from edge_client.config import ClientConfig
from edge_client.state import StateStore
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.algorithms import LocalDP
from flora.errors import ProtocolError, RejectReason
from flora.modeling.lora_factors import fit_to_rank
from flora.protocol import (
    Envelope,
    Topics,
    adapter_from_body,
    adapter_to_body,
    envelope_from_bytes,
)
from flora.protocol.signing import Signer, load_public_key, seal, verify
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
        # End-to-end integrity (optional): sign what we send; act only on what the coordinator signed.
        self.signer = Signer.from_file(config.signing_key) if config.signing_key else None
        self.coordinator_key = load_public_key(config.coordinator_public_key) if config.coordinator_public_key else None
        # The device's own client hooks, run after the instruction's: local DP is set here, not by the coordinator.
        local_dp = LocalDP.from_settings(config.dp_clip_norm, config.dp_noise_multiplier)
        self.local_hooks = (local_dp,) if local_dp is not None else ()

    # -- messages we send ---------------------------------------------------------------
    def _status(self, state: str) -> Message:
        data: dict[str, Any] = {"state": state, "last_round_trained": self.state.last_round_trained}
        if state != "offline":
            data["capabilities"] = detect_capabilities(
                self.trainer.clip.device,
                self.trainer.num_examples,
                self.trainer.clip.quantization,  # in effect, after any fallback
                configured_quantization=self.config.quantization,
            )
            data["recipe"] = self.config.recipe
        env = Envelope(kind="status", run=self.config.run_id, sender=self.config.node_id, data=data)
        return Message(self.topics.status(self.config.node_id), seal(env, self.signer), qos=1, retain=True)

    def start(self) -> None:
        self.transport.connect(will=self._status("offline"))
        self.transport.subscribe(self.topics.instruction, qos=1)
        self.transport.subscribe(self.topics.metrics, qos=1)
        self.transport.publish(self._status("online"))
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
        try:
            while not (self.finished and self.config.exit_when_finished):
                if deadline is not None and time.monotonic() > deadline:
                    break
                message = self.transport.receive(timeout=0.5)
                if message is not None:
                    self.handle(message)
        finally:
            self.stop()

    def handle(self, message: Message) -> None:
        if message.topic == RECONNECTED:
            self.transport.publish(self._status("online"))  # our Will may have fired meanwhile
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
        if self.coordinator_key is not None and env.kind in ("train", "finished", "round_result"):
            try:
                verify(message.payload, self.coordinator_key, signer="the coordinator")
            except ProtocolError as exc:
                log.error("refused %s for round %s on %s: %s", env.kind, env.round, message.topic, exc)
                return
        if env.kind == "train":
            self._on_train(env)
        elif env.kind == "round_result":
            if self.config.node_id in env.data.get("accepted", []) and env.round is not None:
                self.store.acknowledge(self.state, env.round)
        elif env.kind == "finished":
            if not self.finished:
                log.info("run %s finished after round %s", env.run, env.round)
            self.finished = True

    def _on_train(self, env: Envelope) -> None:
        round_ = env.round
        if round_ is None or self.config.node_id not in env.data.get("selected", []):
            return
        if round_ <= self.state.last_round_trained:
            # Never train twice for one instruction; re-send the finished update if it was not acknowledged.
            pending = self.store.pending_payload() if self.state.pending_round == round_ else None
            if pending is not None:
                log.info("re-sending the update for round %d", round_)
                self._publish_update(pending)
            return
        if env.data.get("recipe") not in (None, self.config.recipe):
            log.error(
                "round %d uses recipe %r but this device is configured for %r; fix recipe in the client config",
                round_,
                env.data.get("recipe"),
                self.config.recipe,
            )
            return
        # No deadline check here: device clocks drift; the coordinator decides what is late.
        try:
            settings = TrainSettings.from_instruction(env.data.get("train", {}))
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
        log.info(
            "round %d: sent update (%d bytes, loss %.4f, %.1fs)",
            round_,
            len(payload),
            metrics["train_loss"],
            metrics["seconds"],
        )

    def _publish_update(self, payload: bytes) -> None:
        self.transport.publish(Message(self.topics.update(self.config.node_id), payload, qos=1))
