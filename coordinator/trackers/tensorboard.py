"""TensorBoard tracker: per-round scalars and the run's parameters, in an event-file directory.

    tensorboard --logdir <tracker_dir>/tensorboard

Scalars are tagged `round/<name>` at step = round; the parameters are one text summary, `run/params`.
A resumed run appends a new event file to the same directory, continuing at its next round.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.events import RoundEnded, RunFailed, RunFinished, RunStarted
from coordinator.trackers import round_values, run_params

__all__ = ["TensorBoardTracker"]


class TensorBoardTracker:
    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None

    def on_run_started(self, event: RunStarted) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        params = run_params(event.config)
        self._writer.add_text("run/params", "```\n" + json.dumps(params, indent=2) + "\n```", event.first_round - 1)

    def on_round_ended(self, event: RoundEnded) -> None:
        if self._writer is None:
            return
        for name, value in round_values(event.record).items():
            self._writer.add_scalar(f"round/{name}", value, event.round)
        self._writer.flush()  # a crash loses no completed round

    def on_run_finished(self, event: RunFinished) -> None:
        self._close()

    def on_run_failed(self, event: RunFailed) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
