"""The grid loop: every cell not yet finished, in order, with a progress view; resumable by construction.

A finished cell's row is written atomically to `out/cells/KEY.json` and never run again: an interrupted grid
(Ctrl-C, a reboot, a crash) continues with the first cell that has no row. After each cell the summaries
(results.csv, results.json, table.md, plots/) are rewritten from all rows, so they are always current.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flora.app.simulate.experiment import ExperimentConfig
from flora.app.simulate.report import write_summaries
from flora.files import atomic_write_json

log = logging.getLogger(__name__)


def base_model(exp: ExperimentConfig) -> str:
    """The checkpoint directory cells start from: 'tiny' and 'pretrained-digits' are made (and cached) here."""
    if exp.model == "tiny":
        from flora.modeling.tiny import write_tiny_clip

        path = exp.out / "models" / "tiny-clip"
        if not (path / "config.json").is_file():
            write_tiny_clip(path, seed=0)
        return str(path)
    if exp.model == "pretrained-digits":
        from flora.modeling.pretrain import pretrained_digits_model

        return str(pretrained_digits_model())
    return exp.model


def finished_rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = {}
    for path in sorted((out / "cells").glob("*.json")):
        row = json.loads(path.read_text())
        rows[row["key"]] = row
    return rows


def run_grid(
    exp: ExperimentConfig, *, progress: bool = True, processes: bool = False, broker: str | None = None
) -> list[dict[str, Any]]:
    """Run every unfinished cell of `exp`; returns every row (finished before and now), in grid order.

    `processes`: each cell's clients run as `flora client` processes over `broker` (default: an embedded one).
    """
    from tqdm import tqdm

    from flora.app.simulate.cell import run_cell

    out = Path(exp.out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(exist_ok=True)  # the embedded broker's log goes there before any cell writes to it
    cells = exp.cells()
    done = finished_rows(out)
    todo = [c for c in cells if c.key not in done]
    if done:
        log.info("resuming: %d of %d cells already finished", len(cells) - len(todo), len(cells))
    import torch

    torch.set_num_threads(exp.threads)
    model = base_model(exp)
    embedded = None
    broker_url = broker
    if processes and broker is None:
        from flora.transport.embedded import embedded_broker

        embedded = embedded_broker(log_path=out / "work" / "broker.log").start()
        broker_url = embedded.url
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", disable=not progress, desc=exp.name)
    try:
        for cell in todo:
            bar.set_description(f"{cell.key}")
            started = time.perf_counter()

            def on_round(round_: int, _started=started) -> None:
                per_round = (time.perf_counter() - _started) / round_
                bar.set_postfix_str(f"round {round_}/{exp.rounds}, cell ~{per_round * exp.rounds:.0f}s")

            row = run_cell(exp, cell, model, out / "work", on_round=on_round, broker_url=broker_url)
            atomic_write_json(out / "cells" / f"{cell.key}.json", row)
            done[cell.key] = row
            write_summaries(exp, [done[c.key] for c in cells if c.key in done], out)
            bar.update(1)
    finally:
        bar.close()
        if embedded is not None:
            embedded.stop()
    rows = [done[c.key] for c in cells if c.key in done]
    write_summaries(exp, rows, out)
    return rows
