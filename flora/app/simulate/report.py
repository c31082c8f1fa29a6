"""The grid's outputs: results.csv and results.json (one row per cell), table.md, plots/ (accuracy per round).

table.md is the paper's comparison: one line per setting (recipe, split, strategy, objective), the test accuracy
as mean ± standard deviation over its seeds beside the final round's validation accuracy (what settings are chosen
on, so a choice can be read off the same table), and what the recipe costs (trainable parameters, bytes per update).
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from flora.files import atomic_write_bytes, atomic_write_json

COLUMNS = (
    "key", "recipe", "split", "strategy", "objective", "seed", "model", "clients", "rounds", "local_epochs",
    "client_optimizer", "train_examples", "initial_validation_accuracy", "final_validation_accuracy", "test_accuracy",
    "test_loss", "trainable_parameters", "bytes_per_update", "bytes_per_round", "seconds_per_round", "peak_rss_mb",
    "seconds", "validation_accuracy_per_round",
)  # fmt: skip


def mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def settings(rows: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by setting (recipe, split, strategy, objective), in first-seen order."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[(row["recipe"], row["split"], row["strategy"], row["objective"])].append(row)
    return grouped


def table_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| recipe | split | strategy | objective | test accuracy % (mean ± sd) | validation % (mean ± sd) | seeds "
        "| trainable params | bytes / update | s / round | start % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (recipe, split, strategy, objective), group in settings(rows).items():
        mean, sd = mean_spread([100 * r["test_accuracy"] for r in group])
        val_mean, val_sd = mean_spread([100 * r["final_validation_accuracy"] for r in group])
        seconds = statistics.fmean(r["seconds_per_round"] for r in group)
        start = statistics.fmean(100 * r["initial_validation_accuracy"] for r in group)  # before round 1
        lines.append(
            f"| {recipe} | {split} | {strategy} | {objective} | {mean:.1f} ± {sd:.1f} | {val_mean:.1f} ± {val_sd:.1f} "
            f"| {len(group)} "
            f"| {group[0]['trainable_parameters']:,} | {group[0]['bytes_per_update']:,} | {seconds:.1f} | {start:.1f} |"
        )
    return "\n".join(lines) + "\n"


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["validation_accuracy_per_round"] = " ".join(f"{a:.4f}" for a in row["validation_accuracy_per_round"])
        writer.writerow(flat)
    return buffer.getvalue()


def plot_rounds(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per split, one line per (recipe, strategy, objective): validation accuracy per round, seed mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_split: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        label = f"{row['recipe']} / {row['strategy']} / {row['objective']}"
        by_split[row["split"]][label].append(
            [row["initial_validation_accuracy"], *row["validation_accuracy_per_round"]]
        )
    splits = list(by_split)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False, sharey=True)
    for ax, split in zip(axes[0], splits):
        for label, curves in by_split[split].items():
            length = min(len(c) for c in curves)
            mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(length)]
            ax.plot(range(length), mean, marker=".", label=label)
        ax.set_title(split)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation accuracy %")
    legend: dict[str, object] = {}  # every panel's lines (the centralized panel has fewer), each label once
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 3), 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def write_summaries(exp: Any, rows: list[dict[str, Any]], out: Path) -> None:
    if not rows:
        return
    atomic_write_json(out / "results.json", {"experiment": exp.name, "cells": rows})
    atomic_write_bytes(out / "results.csv", results_csv(rows).encode())
    atomic_write_bytes(out / "table.md", table_markdown(rows).encode())
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        plot_rounds([r for r in rows if r["recipe"] == recipe], out / "plots" / f"accuracy-{recipe}.png")
