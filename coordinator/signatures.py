"""The coordinator's end-to-end integrity: sign what it publishes, authenticate what devices send.

Off unless configured. With `signing_key`, every envelope the coordinator publishes is signed (clients with
`coordinator_public_key` refuse anything else). With `device_keys_dir`, an update is checked against its
sender's provisioned public key before anything it claims is believed (docs/PROTOCOL.md §8), and then bound
to this round: a signed update names the instruction it answers (`in_reply_to`), which must be one this
coordinator published for the open round. Those instruction ids are kept in the checkpoint directory, so a
restarted coordinator still accepts the updates the broker queued for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from coordinator.config import CoordinatorConfig
from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.files import atomic_write_json
from flora.protocol.envelope import Envelope
from flora.protocol.signing import KeyDirectory, Signer, is_signed, seal, verify

log = logging.getLogger(__name__)

INSTRUCTIONS_FILE = "instruction_ids.json"  # the open round's instruction msg_ids (signed updates answer one)


class Authenticator:
    def __init__(self, config: CoordinatorConfig):
        self.run_id = config.run_id
        self.signer = Signer.from_file(config.signing_key) if config.signing_key else None
        if config.device_keys_dir is not None and not Path(config.device_keys_dir).is_dir():
            raise ConfigError(
                f"device_keys_dir {config.device_keys_dir} is not a directory; `flora provision` writes the devices' "
                "public keys to coordinator/device-keys/"
            )
        self.keys = KeyDirectory(config.device_keys_dir) if config.device_keys_dir else None
        self.required = bool(config.require_signatures)
        self._path = Path(config.checkpoint_dir) / INSTRUCTIONS_FILE
        self._round, self._instructions = self._load()

    def seal(self, env: Envelope) -> bytes:
        return seal(env, self.signer)

    # -- updates -----------------------------------------------------------------------------
    def check_update(self, payload: bytes, env: Envelope, topic_node: str) -> bool:
        """Authenticity, before anything the update claims is believed. True when it was verified."""
        if self.keys is None or env.sender != topic_node:
            return False  # not checking signatures; or a sender/topic mismatch, which validation rejects
        if not self.required and not is_signed(payload):
            return False  # migration: unsigned updates are still accepted
        verify(payload, self.keys.get(env.sender), signer=env.sender)
        return True

    def check_binding(self, env: Envelope, verified: bool) -> None:
        """A verified update must answer an instruction this coordinator published for this round."""
        if not verified:
            return
        reply_to = env.data.get("in_reply_to")
        if env.round != self._round or reply_to not in self._instructions:
            raise ProtocolError(
                RejectReason.REPLAYED,
                f"{env.sender}'s update for round {env.round} answers instruction {str(reply_to)[:40]!r}, which this "
                "coordinator did not publish for the open round (a replay, e.g. from an earlier run with this run id)",
            )

    def instruction_published(self, round_: int, msg_id: str) -> None:
        """Record an instruction before it is published (a crash right after must not forget it)."""
        if self.keys is None:
            return
        if round_ != self._round:
            self._round, self._instructions = round_, []
        self._instructions.append(msg_id)
        atomic_write_json(self._path, {"run": self.run_id, "round": round_, "instructions": self._instructions})

    def knows(self, node: str) -> bool:
        """Whether `node` is a provisioned device (it has a public key here)."""
        if self.keys is None:
            return False
        try:
            self.keys.get(node)
        except ProtocolError:
            return False
        return True

    # -- status ------------------------------------------------------------------------------
    def status_ok(self, payload: bytes, env: Envelope) -> bool:
        """Whether a node's status may be believed (an unauthenticated 'online' must not get a node selected)."""
        try:
            self.check_update(payload, env, env.sender)
        except ProtocolError as exc:
            log.warning("dropped status of %s: %s", env.sender, exc)
            return False
        return True

    def _load(self) -> tuple[int | None, list[str]]:
        try:
            saved = json.loads(self._path.read_text())
        except (OSError, ValueError):
            return None, []
        if not isinstance(saved, dict) or saved.get("run") != self.run_id or not isinstance(saved.get("round"), int):
            return None, []
        return saved["round"], [str(i) for i in saved.get("instructions", [])]
