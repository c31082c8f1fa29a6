"""Experiment trackers: optional subscribers to the coordinator's events (coordinator/events.py).

Enabled in the coordinator's TOML with `trackers = ["tensorboard", "mlflow"]`; each needs its extra
(`pip install "flora-edge[tensorboard]"`, `"flora-edge[mlflow]"`), and a missing one is a ConfigError
that names it. Every tracker logs the same per-round values (`round_values`) at step = round, and the
run's parameters (`run_params`) once at run start.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from flora.errors import ConfigError
from flora.records import RoundRecord

__all__ = ["TRACKERS", "make_tracker", "round_values", "run_params"]

# tracker name -> (module the tracker needs, extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}

# What every tracker logs per round: the record's own fields, plus the round's rejections summed.
ROUND_FIELDS = (
    "accuracy",
    "loss",
    "train_loss",
    "participants",
    "bytes_up",
    "bytes_down",
    "seconds",
    "aggregation_error",
)


def round_values(record: RoundRecord) -> dict[str, float]:
    """The round's numbers as floats; a value the round did not have (no evaluation data, a non-finite
    loss) is left out rather than logged as a fake number."""
    values = record.to_dict()  # non-finite already None
    out = {key: float(values[key]) for key in ROUND_FIELDS if values.get(key) is not None}
    out["rejections"] = float(sum(record.rejected.values()))
    return out


def run_params(config: dict[str, Any]) -> dict[str, str]:
    """The settings as flat strings (both trackers take string parameters); strategy, recipe and rounds first."""
    first = ("strategy", "recipe", "rounds")
    ordered = [*first, *sorted(k for k in config if k not in first)]
    return {key: str(config[key]) for key in ordered if key in config}


def make_tracker(name: str, config: CoordinatorConfig) -> Any:
    """The subscriber for tracker `name`; a ConfigError naming the extra if its package is not installed."""
    if name not in TRACKERS:
        raise ConfigError(f"unknown tracker {name!r}; trackers are: {', '.join(sorted(TRACKERS))}")
    module, extra = TRACKERS[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f'tracker {name!r} needs the {module} package: pip install "flora-edge[{extra}]"')
    tracker_dir = Path(config.tracker_dir or Path(config.output_dir) / "trackers")
    if name == "tensorboard":
        from coordinator.trackers.tensorboard import TensorBoardTracker

        return TensorBoardTracker(tracker_dir / "tensorboard" / config.run_id)
    from coordinator.trackers.mlflow import MlflowTracker

    uri = config.mlflow_tracking_uri or f"sqlite:///{(tracker_dir / 'mlflow.db').resolve()}"
    return MlflowTracker(uri, experiment=config.run_id, artifact_dir=tracker_dir / "mlflow-artifacts")
