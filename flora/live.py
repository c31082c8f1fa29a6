"""A live per-round view of a run, fed by the coordinator's retained round results over MQTT.

Used by `flora demo` and `flora status`: it observes the broker like any other client, so it
shows the same thing whether the coordinator runs in this process, another, or another host.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

COLUMNS = ("round", "clients", "accuracy", "loss", "train loss", "KiB up", "KiB down", "s")


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f}"


def round_row(record: dict[str, Any]) -> list[str]:
    acc = record.get("accuracy")
    loss = record.get("loss")
    return [
        f"{record['round']}/{record.get('rounds_total', '?')}",
        f"{record['participants']}/{record['selected']}",
        "n/a" if acc is None else f"{acc * 100:.1f}%",
        "n/a" if loss is None else f"{loss:.3f}",
        f"{record.get('train_loss', float('nan')):.3f}",
        _kib(record["bytes_up"]),
        _kib(record["bytes_down"]),
        f"{record['seconds']:.1f}",
    ]


def rounds_table(records: list[dict[str, Any]], title: str, initial_accuracy: float | None = None) -> Table:
    table = Table(title=title, title_justify="left")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    if initial_accuracy is not None:
        table.add_row("0", "-", f"{initial_accuracy * 100:.1f}%", "-", "-", "-", "-", "-")
    for record in records:
        table.add_row(*round_row(record))
    return table


def print_round_line(console: Console, record: dict[str, Any]) -> None:
    cells = dict(zip(COLUMNS, round_row(record)))
    console.print("  ".join(f"{k}={v}" for k, v in cells.items()), highlight=False)
