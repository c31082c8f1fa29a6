"""One cell of the grid: the real coordinator and the real edge agents, over the in-memory broker.

The coordinator is built from a CoordinatorConfig exactly as `flora coordinator` builds it; the clients are a
VirtualFleet of real EdgeAgents sharing one frozen base. The coordinator evaluates on the validation split every
round; the test split is scored once, with the final global adapter. The result is one flat, JSON-able row.
"""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.live_view import RoundView
from coordinator.main import build_coordinator
from coordinator.outputs import MetricsPlot
from flora.app.simulate.data import cell_data
from flora.app.simulate.experiment import Cell, ExperimentConfig, strategy_name
from flora.app.simulate.fleet import VirtualFleet
from flora.app.simulate.processes import ProcessFleet
from flora.data.datasets import pixel_values
from flora.modeling import scoring
from flora.modeling.recipes import get_recipe
from flora.transport import MemoryBroker


class RoundProgress:
    """Tells the grid's progress view which round the cell is in (a coordinator event subscriber)."""

    def __init__(self, callback):
        self.callback = callback

    def on_round_ended(self, event) -> None:
        self.callback(event.round)


def run_cell(
    exp: ExperimentConfig, cell: Cell, model: str, work_dir: Path, on_round=None, *, broker_url: str | None = None
) -> dict[str, Any]:
    """Run `cell` to the end; returns its row (see report.COLUMNS). `model` is the base checkpoint directory.

    Without `broker_url`: every client in this process (VirtualFleet, in-memory broker). With it (mqtt://...):
    every client a `flora client` process (ProcessFleet) on that broker.
    """
    started = time.perf_counter()
    data = cell_data(exp, cell.split, cell.seed, work_dir)
    run_dir = work_dir / "runs" / cell.key
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted cell starts over: only finished cells count
    broker = f"sim-{cell.key}-{time.monotonic_ns()}"
    url = broker_url or f"memory://{broker}"
    run_id = f"sim-{time.monotonic_ns()}"  # a shared broker may keep an earlier cell's retained messages
    config = CoordinatorConfig(
        model=model,
        run_id=run_id,
        broker_url=url,
        recipe=cell.recipe,
        rounds=exp.rounds,
        min_clients_per_round=len(data.clients),
        min_available_clients=len(data.clients),
        quorum=len(data.clients),
        round_deadline_s=3600.0,
        wait_for_clients_s=600.0,
        local_epochs=exp.local_epochs,
        client_optimizer=exp.client_optimizer,
        learning_rate=exp.learning_rate,
        weight_decay=exp.weight_decay,
        batch_size=exp.batch_size,
        prompt_template=exp.prompt_template,
        objective=cell.objective.removesuffix("-lc"),
        logit_calibration=exp.logit_calibration if cell.objective.endswith("-lc") else 0.0,
        strategy=strategy_name(cell.strategy),
        strategy_params=exp.params_of(cell.strategy),
        checkpoint_dir=run_dir / "checkpoint",
        output_dir=run_dir / "out",
        eval_data_dir=data.validation_dir,
        wire_encoding=exp.wire_encoding,
        device=exp.device,
        seed=cell.seed,
        log_level="WARNING",
    )
    subscribers = [RoundProgress(on_round)] if on_round is not None else []
    coordinator = build_coordinator(config, subscribers=subscribers)
    for subscriber in coordinator.events.subscribers:
        if isinstance(subscriber, (MetricsPlot, RoundView)):
            # A cell's metrics.png and live table would be redrawn every round and thrown away with the cell
            # (matplotlib took most of a tiny round); the grid draws its own plots and shows its own progress.
            coordinator.events.unsubscribe(subscriber)
    fleet_class = VirtualFleet if broker_url is None else ProcessFleet
    fleet = fleet_class(
        model,
        get_recipe(cell.recipe) if broker_url is None else cell.recipe,
        data.clients,
        broker_url=url,
        run_id=run_id,
        state_dir=run_dir / "clients",
        batch_size=exp.batch_size,
        device=exp.device,
        seed=cell.seed,
    )
    try:
        fleet.start()
        report = coordinator.run()
    finally:
        fleet.stop()
        MemoryBroker._named.pop(broker, None)  # the broker's retained adapters go with the cell
    evaluator = coordinator.evaluator
    evaluator.load(coordinator.global_tensors)
    test = scoring.evaluate(
        evaluator.model,
        evaluator.clip.tokenizer,
        pixel_values(evaluator.clip.image_processor, data.test.images).to(evaluator.clip.device),
        data.test.labels,
        scoring.class_prompts(data.test.class_names, exp.prompt_template),
    )
    rounds = report["rounds"]
    trainable = sum(int(t.size) for t in coordinator.global_tensors.values())
    row = {
        "key": cell.key,
        "recipe": cell.recipe,
        "split": cell.split,
        "strategy": cell.strategy,
        "objective": cell.objective,
        "seed": cell.seed,
        "model": exp.model,
        "clients": len(data.clients),
        "rounds": exp.rounds,
        "local_epochs": exp.local_epochs,
        "client_optimizer": exp.client_optimizer,
        "train_examples": data.train_examples,
        "initial_validation_accuracy": report["initial_accuracy"],
        "validation_accuracy_per_round": [r["accuracy"] for r in rounds],
        "final_validation_accuracy": rounds[-1]["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "trainable_parameters": trainable,
        "bytes_per_update": 4 * trainable,  # float32 on the wire (the paper's comparison)
        "bytes_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / len(rounds),
        "seconds_per_round": sum(r["seconds"] for r in rounds) / len(rounds),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # the process's high-water mark
        "seconds": time.perf_counter() - started,
    }
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of a finished cell are not needed; its row is
    return row
