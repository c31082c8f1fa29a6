"""Progress that survives a reboot: the last round trained and the update not yet acknowledged.

Written atomically (temp file, fsync, rename), so a power cut leaves the old state or the new,
never half of one. The pending update is kept as the exact bytes that were published, so a
restarted agent re-sends the same update rather than training twice for one instruction.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from flora.errors import StateError
from flora.files import atomic_write_bytes


@dataclass
class ClientState:
    run_id: str = ""
    last_round_trained: int = -1
    pending_round: int | None = None  # round of the update in pending_update.bin, until acknowledged


class StateStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.state_path = self.directory / "state.json"
        self.pending_path = self.directory / "pending_update.bin"

    def load(self, run_id: str) -> ClientState:
        if not self.state_path.is_file():
            return ClientState(run_id=run_id)
        try:
            raw = json.loads(self.state_path.read_text())
            state = ClientState(**raw)
            valid = (
                isinstance(state.run_id, str)
                and isinstance(state.last_round_trained, int)
                and (state.pending_round is None or isinstance(state.pending_round, int))
            )
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            problem = str(exc)
        else:
            problem = None if valid else "a field has the wrong type"
        if problem is not None:
            raise StateError(
                f"client state {self.state_path} is corrupt ({problem}); delete it (and pending_update.bin beside it) "
                "to start afresh: the device then trains again from the next instruction"
            )
        if state.run_id != run_id:  # a new run: old progress does not apply
            return ClientState(run_id=run_id)
        return state

    def save(self, state: ClientState) -> None:
        atomic_write_bytes(self.state_path, json.dumps(asdict(state), indent=2).encode())

    def save_pending(self, state: ClientState, round_: int, payload: bytes) -> None:
        atomic_write_bytes(self.pending_path, payload)
        state.last_round_trained = round_
        state.pending_round = round_
        self.save(state)

    def pending_payload(self) -> bytes | None:
        return self.pending_path.read_bytes() if self.pending_path.is_file() else None

    def acknowledge(self, state: ClientState, round_: int) -> None:
        if state.pending_round == round_:
            state.pending_round = None
            self.save(state)
            self.pending_path.unlink(missing_ok=True)
