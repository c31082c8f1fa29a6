"""`flora simulate`: a two-cell grid end to end on the tiny model, resume, and the table against the cells."""

from __future__ import annotations

import json
import logging
import re

import pytest

from flora.app.cli import main
from flora.app.simulate import load_experiment, run_grid
from flora.app.simulate.experiment import split_kwargs
from flora.data.datasets import write_image_folder
from flora.errors import ConfigError


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory, digits):
    return write_image_folder(digits.subset(range(300)), tmp_path_factory.mktemp("data") / "digits-300")


def write_experiment(path, dataset, out):
    path.write_text(
        f"""
name = "two-cells"
out = "{out}"
dataset = "{dataset}"
clients = 3
rounds = 2
batch_size = 16
recipes = ["paper"]
splits = ["dirichlet-0.5"]
strategies = ["fedavg"]
objectives = ["class-prompts", "in-batch"]
seeds = [0]
"""
    )
    return path


def table_rows(out):
    rows = {}
    for line in (out / "table.md").read_text().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[tuple(cells[:4])] = cells
    return rows


def test_a_two_cell_grid_runs_end_to_end_and_resumes_without_rerunning(tmp_path, small_digits, caplog):
    out = tmp_path / "grid"
    config = write_experiment(tmp_path / "experiment.toml", small_digits, out)
    assert main(["simulate", "--config", str(config)]) == 0

    cells = sorted((out / "cells").glob("*.json"))
    assert [c.stem for c in cells] == [
        "paper__dirichlet-0.5__fedavg__class-prompts__s0",
        "paper__dirichlet-0.5__fedavg__in-batch__s0",
    ]
    rows = [json.loads(c.read_text()) for c in cells]
    for row in rows:
        assert len(row["validation_accuracy_per_round"]) == 2 and 0 <= row["test_accuracy"] <= 1
        assert row["trainable_parameters"] == 512 and row["bytes_per_update"] == 2048  # r=2 on 4 tiny out_projs
        assert row["bytes_per_round"] > 3 * 2048 and row["seconds_per_round"] > 0 and row["peak_rss_mb"] > 0
        assert row["clients"] == 3
    assert (out / "plots" / "accuracy-paper.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("key,recipe,split")
    assert json.loads((out / "results.json").read_text())["cells"] == rows

    # The table's figures are the cells' own: test and validation accuracy (one seed: the mean is the cell's),
    # cost per recipe.
    table = table_rows(out)
    for row in rows:
        line = table[(row["recipe"], row["split"], row["strategy"], row["objective"])]
        assert line[4] == f"{100 * row['test_accuracy']:.1f} ± 0.0"
        assert line[5] == f"{100 * row['final_validation_accuracy']:.1f} ± 0.0"
        assert line[7] == f"{row['trainable_parameters']:,}" and line[8] == f"{row['bytes_per_update']:,}"

    # Resume: the finished cell is kept as it is, the missing one runs again.
    kept, lost = cells
    kept_before = (kept.stat().st_mtime_ns, kept.read_text())
    lost.unlink()
    with caplog.at_level(logging.INFO, logger="flora.app.simulate.grid"):
        again = run_grid(load_experiment(config), progress=False)
    assert "resuming: 1 of 2 cells already finished" in caplog.text
    assert (kept.stat().st_mtime_ns, kept.read_text()) == kept_before
    assert lost.is_file() and [r["key"] for r in again] == [c.stem for c in cells]
    assert again[0] == rows[0]


def test_table_means_and_spreads_over_seeds():
    from flora.app.simulate.report import table_markdown

    base = {"recipe": "paper", "split": "iid", "strategy": "fedavg", "objective": "in-batch"}
    rows = [
        {**base, "test_accuracy": a, "final_validation_accuracy": v, "initial_validation_accuracy": 0.1}
        | {"trainable_parameters": 512, "bytes_per_update": 2048, "seconds_per_round": 1.0}
        for a, v in ((0.5, 0.4), (0.6, 0.4), (0.7, 0.7))
    ]
    (line,) = [x for x in table_markdown(rows).splitlines() if x.startswith("| paper")]
    assert re.search(r"\| 60\.0 ± 10\.0 \| 50\.0 ± 17\.3 \| 3 \| 512 \| 2,048 \|", line)


def test_splits_are_named_with_their_parameter():
    assert split_kwargs("dirichlet-0.1") == ("dirichlet", {"beta": 0.1})
    assert split_kwargs("pathological-2") == ("pathological", {"classes_per_client": 2})
    assert split_kwargs("few-shot-16") == ("few-shot", {"shots": 16})
    assert split_kwargs("iid") == ("iid", {}) and split_kwargs("centralized") == ("centralized", {})
    with pytest.raises(ConfigError, match="dirichlet-BETA"):
        split_kwargs("dirichlet")


def test_a_bad_experiment_exits_2_naming_the_setting(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('splits = ["dirichlet"]\n')
    assert main(["simulate", "--config", str(config)]) == 2
    assert "dirichlet-BETA" in capsys.readouterr().err
