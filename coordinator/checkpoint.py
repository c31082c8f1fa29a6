"""Never lose a completed round: each round's adapter and state are written atomically.

Layout of checkpoint_dir:
    rounds/000007/             PEFT adapter directory of the global adapter after round 7
    state.json                 {"round": 7, "adapter_dir": "rounds/000007", history, strategy, registry}

The adapter directory is complete before state.json names it, and state.json is replaced in
one rename, so after a crash at any instant state.json points at a whole checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from flora.errors import StateError
from flora.files import atomic_path, atomic_write_json, prune_partial
from flora.modeling.adapter import save_adapter_dir

KEEP_ROUNDS = 2
INFLIGHT_FILE = "inflight.json"  # the open round's selection
STRATEGY_FILE = "strategy_state.safetensors"  # server-optimizer moments; not part of the PEFT adapter


class CheckpointStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.state_path = self.directory / "state.json"

    def prune_leftovers(self) -> list[Path]:
        """Remove what a kill during a checkpoint write left behind (a half-written adapter dir, a temporary
        state file): nothing names them, and nothing else would ever remove them."""
        return prune_partial(self.directory) + prune_partial(self.directory / "rounds")

    def load(self) -> dict[str, Any] | None:
        """The last complete checkpoint's state (with an absolute adapter_dir), or None if fresh."""
        if not self.state_path.is_file():
            return None
        fix = "restore it from a backup, or move the checkpoint directory away to start the run afresh"
        try:
            state = json.loads(self.state_path.read_text())
        except OSError as exc:
            raise StateError(
                f"cannot read checkpoint {self.state_path}: {exc.strerror or exc}; check its permissions"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # It is written atomically, so only the disk or a manual edit can have damaged it.
            raise StateError(f"checkpoint {self.state_path} is corrupt ({exc}); {fix}") from None
        if not (
            isinstance(state, dict)
            and isinstance(state.get("round"), int)
            and isinstance(state.get("adapter_dir"), str)
            and isinstance(state.get("history", []), list)
        ):
            raise StateError(f"checkpoint {self.state_path} lacks its round or adapter_dir; {fix}")
        state["adapter_dir"] = str(self.directory / state["adapter_dir"])
        if not (Path(state["adapter_dir"]) / "adapter_model.safetensors").is_file():
            raise StateError(f"checkpoint {self.state_path} names {state['adapter_dir']}, which is missing; {fix}")
        rounds = [r.get("round") if isinstance(r, dict) else None for r in state.get("history", [])]
        if rounds != list(range(1, state["round"] + 1)):
            # Every round from 1 is recorded once, in order: a gap or a repeat means the file was edited or mixed
            # with another run's, and resuming from it would publish a history that never happened.
            shown = rounds if len(rounds) <= 12 else [*rounds[:5], "...", *rounds[-5:]]
            raise StateError(
                f"checkpoint {self.state_path} has round {state['round']} but its history records rounds {shown}, "
                f"not 1 to {state['round']} in order; {fix}"
            )
        return state

    def save(
        self,
        round_: int,
        peft_model: Any,
        state: dict[str, Any],
        *,
        base_model: str,
        strategy_state: dict | None = None,
    ) -> Path:
        """Adapter dir (+ server-optimizer state beside it), complete before state.json names it."""
        from safetensors.numpy import save_file

        relative = Path("rounds") / f"{round_:06d}"
        adapter_dir = save_adapter_dir(peft_model, self.directory / relative, base_model=base_model)
        if strategy_state:
            with atomic_path(adapter_dir / STRATEGY_FILE) as tmp:
                save_file({k: np.ascontiguousarray(v) for k, v in strategy_state.items()}, str(tmp))
        atomic_write_json(self.state_path, {**state, "round": round_, "adapter_dir": str(relative)})
        self._prune(keep=relative.name)
        return adapter_dir

    def save_inflight(self, round_: int, selected: list[str]) -> None:
        """Record the open round's selection, so a restarted coordinator can finish the same round."""
        atomic_write_json(self.directory / INFLIGHT_FILE, {"round": round_, "selected": selected})

    def load_inflight(self, round_: int) -> dict[str, Any] | None:
        path = self.directory / INFLIGHT_FILE
        if not path.is_file():
            return None
        try:
            inflight = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # written atomically, so only a damaged disk gets here: start the round afresh
        return inflight if inflight.get("round") == round_ and inflight.get("selected") else None

    def load_strategy_state(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        path = Path(state["adapter_dir"]) / STRATEGY_FILE
        return load_file(str(path)) if path.is_file() else {}

    def _prune(self, keep: str) -> None:
        rounds = sorted(p for p in (self.directory / "rounds").iterdir() if p.is_dir() and not p.name.startswith("."))
        for old in rounds[:-KEEP_ROUNDS]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
