"""`flora simulate --processes`: a cell's clients as `flora client` processes over a real Mosquitto."""

from __future__ import annotations

import json

import pytest

from flora.app.cli import main
from flora.data.datasets import write_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def one_cell_experiment(tmp_path, digits, recipe: str):
    """A one-cell grid (2 clients, 1 round, IID) of `recipe` on 200 digits; its config file and out folder."""
    dataset = write_image_folder(digits.subset(range(200)), tmp_path / "digits-200")
    out = tmp_path / "grid"
    config = tmp_path / "experiment.toml"
    config.write_text(
        f'name = "{recipe}"\nout = "{out}"\ndataset = "{dataset}"\nclients = 2\nrounds = 1\nbatch_size = 16\n'
        f'recipes = ["{recipe}"]\nsplits = ["iid"]\nstrategies = ["fedavg"]\nobjectives = ["class-prompts"]\n'
        "seeds = [0]\n"
    )
    return config, out


def test_a_cell_runs_with_each_client_in_its_own_process(tmp_path, mosquitto, digits):
    config, out = one_cell_experiment(tmp_path, digits, "paper")
    assert main(["simulate", "--config", str(config), "--processes", "--broker", mosquitto.url]) == 0
    (cell,) = (out / "cells").glob("*.json")
    row = json.loads(cell.read_text())
    assert row["clients"] == 2 and len(row["validation_accuracy_per_round"]) == 1
    assert row["trainable_parameters"] == 512 and row["bytes_per_round"] > 2 * 2048

    # The same cell with the clients in this process, sharing one base: the same training, so the same model.
    assert main(["simulate", "--config", str(config), "--out", str(tmp_path / "in-process")]) == 0
    (twin,) = (tmp_path / "in-process" / "cells").glob("*.json")
    in_process = json.loads(twin.read_text())
    assert in_process["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=0.02)
    assert in_process["validation_accuracy_per_round"] == pytest.approx(row["validation_accuracy_per_round"], abs=0.02)


def test_a_full_fine_tuning_cell_runs_over_the_embedded_broker_from_a_fresh_out_dir(tmp_path, digits):
    """The default broker (embedded, its log under out/work, which does not exist yet) and an adapter of 632 KB,
    over max_message_bytes: every instruction and update goes as chunks between real processes."""
    config, out = one_cell_experiment(tmp_path, digits, "fedfft")
    assert main(["simulate", "--config", str(config), "--processes"]) == 0
    (cell,) = (out / "cells").glob("*.json")
    row = json.loads(cell.read_text())
    assert row["trainable_parameters"] == 157_952 and row["bytes_per_update"] > 120_000  # over one MQTT message
    assert row["bytes_per_round"] > 4 * row["bytes_per_update"]  # two clients, each way
