"""MLflow tracker: per-round metrics and the run's parameters, in an MLflow tracking store.

The default store is a local SQLite file (`<tracker_dir>/mlflow.db`; MLflow's plain-directory store is
in maintenance mode and refuses to open by default); `mlflow_tracking_uri` points elsewhere. The
experiment is named after the run id, and a resumed coordinator continues the same MLflow run (found by
its `flora.run_id` tag) at its next round instead of starting another.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.events import RoundEnded, RunFailed, RunFinished, RunStarted
from coordinator.trackers import round_values, run_params

__all__ = ["RUN_TAG", "MlflowTracker"]

RUN_TAG = "flora.run_id"


class MlflowTracker:
    def __init__(self, tracking_uri: str, *, experiment: str, artifact_dir: Path):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_dir = Path(artifact_dir)
        self._client = None
        self.run_id: str | None = None  # MLflow's id of the run being logged

    def on_run_started(self, event: RunStarted) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(self.experiment, artifact_location=self.artifact_dir.resolve().as_uri())
        )
        earlier = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{event.run_id}'", max_results=1
        )
        if earlier:  # a resumed coordinator: go on logging into the same run
            self.run_id = earlier[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(experiment_id, run_name=event.run_id, tags={RUN_TAG: event.run_id})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in run_params(event.config).items()]  # MLflow's value limit
            client.log_batch(self.run_id, params=params)
        self._client = client

    def on_round_ended(self, event: RoundEnded) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, event.round) for k, v in round_values(event.record).items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def on_run_finished(self, event: RunFinished) -> None:
        self._end("FINISHED")

    def on_run_failed(self, event: RunFailed) -> None:
        self._end("FAILED")

    def _end(self, status: str) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, status=status)
            self._client = None
