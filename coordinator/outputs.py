"""The run's outputs in output_dir, written by subscribers to the coordinator's events.

    report.json      the run report (RunReport.to_dict()), rewritten after every round
    global_adapter/  PEFT adapter directory of the latest global adapter
    metrics.png      accuracy, loss, participants, traffic, aggregation error per round (coordinator/plots.py)

Each round is checkpointed before RoundEnded is emitted, so these files never claim a round that a
restarted coordinator would not resume after. A kill between the checkpoint and these writes leaves them a
round behind: a restarted coordinator emits RunResumed and they are written again from the checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from coordinator.events import RoundEnded, RunFinished, RunResumed
from coordinator.plots import plot_metrics
from flora.files import atomic_write_json
from flora.modeling.adapter import save_adapter_dir
from flora.modeling.training_info import TRAINING_INFO_FILE, TrainingInfo

__all__ = ["PLOT_INTERVAL_S", "MetricsPlot", "ReportWriter"]

# Drawing costs ~0.35 s (measured by bench/coordinator_scale.py): redraw at most this often during a run,
# and always after the last round.
PLOT_INTERVAL_S = 30.0


class ReportWriter:
    """report.json and global_adapter/ after every round. Subscribed as required: a run whose outputs cannot be
    written stops (and resumes from its checkpoint) rather than federating on without them."""

    def __init__(self, output_dir: Path, peft_model: Any, *, base_model: str, training: TrainingInfo | None = None):
        self.output_dir = Path(output_dir)
        self.peft_model = peft_model  # the coordinator's evaluator model, holding the global adapter at RoundEnded
        self.base_model = base_model
        self.training = training  # written beside the adapter: export and infer use its prompt

    def on_round_ended(self, event: RoundEnded) -> None:
        self._write(event.report)

    def on_run_resumed(self, event: RunResumed) -> None:
        self._write(event.report)  # the evaluator's model holds the resumed checkpoint's adapter

    def _write(self, report: Any) -> None:
        atomic_write_json(self.output_dir / "report.json", report.to_dict())
        extra = {TRAINING_INFO_FILE: self.training.to_dict()} if self.training is not None else None
        save_adapter_dir(
            self.peft_model, self.output_dir / "global_adapter", base_model=self.base_model, extra_json=extra
        )

    def on_run_finished(self, event: RunFinished) -> None:
        # A rerun of a finished run executes no round: its report still says what the run produced.
        atomic_write_json(self.output_dir / "report.json", event.report.to_dict())


class MetricsPlot:
    """metrics.png, redrawn at most every `interval_s` during the run and always after the last round."""

    def __init__(self, path: Path, *, interval_s: float = PLOT_INTERVAL_S):
        self.path = Path(path)
        self.interval_s = interval_s
        self._last_drawn = float("-inf")

    def on_round_ended(self, event: RoundEnded) -> None:
        final = event.record.round >= event.record.rounds_total
        if final or time.monotonic() - self._last_drawn >= self.interval_s:
            self.draw(event.report.to_dict())

    def on_run_resumed(self, event: RunResumed) -> None:
        self.draw(event.report.to_dict())

    def draw(self, report: dict[str, Any]) -> None:
        plot_metrics(report, self.path)
        self._last_drawn = time.monotonic()
