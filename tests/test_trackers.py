"""Trackers log what the round records say: read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest

from coordinator.config import CoordinatorConfig
from coordinator.events import EventBus, RoundEnded, RunFinished, RunStarted
from coordinator.trackers import make_tracker, round_values
from flora.errors import ConfigError
from flora.records import RoundRecord, RunReport


def records() -> list[RoundRecord]:
    return [
        RoundRecord(
            round=r,
            rounds_total=2,
            selected=3,
            participants=3 - r,
            accepted=("a", "b")[: 3 - r],
            rejected={"duplicate": r},
            accuracy=0.25 * r,
            loss=2.0 / r,
            train_loss=math.inf if r == 2 else 1.5,  # overflowed on a device: not logged as a number
            num_examples=100,
            aggregation_error=0.01 * r,
            bytes_up=1000 * r,
            bytes_down=2000 * r,
            seconds=1.5 * r,
        )
        for r in (1, 2)
    ]


def drive(tracker, config: CoordinatorConfig) -> list[RoundRecord]:
    """A run's events, as the coordinator emits them, to one tracker."""
    bus = EventBus()
    bus.subscribe(tracker, required=True)  # a tracker error fails the test instead of being logged
    rounds = records()
    report = RunReport(config.run_id, "0.1.0", config.model, config.recipe, config.strategy, config.rounds)
    settings = {"strategy": config.strategy, "recipe": config.recipe, "rounds": config.rounds, "seed": 0}
    bus.emit(RunStarted(run_id=config.run_id, first_round=1, rounds_total=2, report=report, config=settings))
    for i, record in enumerate(rounds):
        report = dataclasses.replace(report, rounds=tuple(rounds[: i + 1]))
        bus.emit(RoundEnded(round=record.round, record=record, report=report))
    bus.emit(RunFinished(report=report))
    return rounds


def config(tmp_path, tracker: str) -> CoordinatorConfig:
    return CoordinatorConfig(
        model="m", run_id="tracked", rounds=2, strategy="fedavg", trackers=[tracker], output_dir=tmp_path / "out"
    )


def test_round_values_leave_out_what_the_round_did_not_have():
    first, second = records()
    assert round_values(first)["train_loss"] == 1.5 and "train_loss" not in round_values(second)
    assert round_values(second)["rejections"] == 2.0 and round_values(second)["participants"] == 1.0


def test_tensorboard_logs_every_round_value_and_the_params(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config(tmp_path, "tensorboard")
    rounds = drive(make_tracker("tensorboard", cfg), cfg)

    log_dir = tmp_path / "out" / "trackers" / "tensorboard" / "tracked"
    reader = EventAccumulator(str(log_dir))
    reader.Reload()
    for record in rounds:
        expected = round_values(record)
        logged = {
            tag.removeprefix("round/"): event.value
            for tag in reader.Tags()["scalars"]
            for event in reader.Scalars(tag)
            if event.step == record.round
        }
        assert logged.keys() == expected.keys()
        assert logged == pytest.approx(expected)  # float32 in the event file
    (text,) = reader.Tensors("run/params/text_summary")
    assert b'"strategy": "fedavg"' in text.tensor_proto.string_val[0]


@pytest.mark.slow
def test_mlflow_logs_every_round_value_and_the_params_and_a_resume_continues_the_run(tmp_path):
    from mlflow import MlflowClient

    cfg = config(tmp_path, "mlflow")
    tracker = make_tracker("mlflow", cfg)
    rounds = drive(tracker, cfg)

    client = MlflowClient(tracking_uri=tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "fedavg" and run.data.params["rounds"] == "2"
    for key in round_values(rounds[0]):
        history = {m.step: m.value for m in client.get_metric_history(tracker.run_id, key)}
        assert history == {r.round: round_values(r)[key] for r in rounds if key in round_values(r)}

    resumed = make_tracker("mlflow", cfg)  # the same run id again: MLflow's run continues
    drive(resumed, cfg)
    assert resumed.run_id == tracker.run_id


def test_a_tracker_without_its_package_is_a_config_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what find_spec sees when the package is absent
    with pytest.raises(ConfigError, match=r'pip install "flora-edge\[mlflow\]"'):
        make_tracker("mlflow", config(tmp_path, "mlflow"))
    with pytest.raises(ConfigError, match="unknown tracker 'wandb'"):
        make_tracker("wandb", config(tmp_path, "mlflow"))


def test_trackers_named_in_the_coordinator_toml_subscribe_to_its_events(tmp_path, tiny_model_dir):
    from coordinator.config import load_coordinator_config
    from coordinator.main import build_coordinator
    from coordinator.trackers.tensorboard import TensorBoardTracker

    toml = tmp_path / "coordinator.toml"
    toml.write_text(
        f'model = "{tiny_model_dir}"\nbroker_url = "memory://trackers-toml"\nrecipe = "both-towers"\n'
        f'trackers = ["tensorboard"]\ntracker_dir = "{tmp_path / "tb"}"\n'
    )
    coordinator = build_coordinator(load_coordinator_config(toml))
    (tracker,) = [s for s in coordinator.events.subscribers if isinstance(s, TensorBoardTracker)]
    assert tracker.log_dir == tmp_path / "tb" / "tensorboard" / "default"
