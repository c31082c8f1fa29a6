"""The coordinator's live terminal view: finished rounds as a table, the open round as a status line.

Shown only when the coordinator's console is a terminal; under systemd or with output redirected
it stays silent and the log lines tell the same story.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from flora.live import rounds_table


class RoundView:
    def __init__(self, run_id: str, rounds_total: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = self.console.is_terminal
        self.run_id, self.rounds_total = run_id, rounds_total
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self._live: Live | None = None

    def __enter__(self) -> RoundView:
        if self.enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def open_round(self, round_: int, selected: int, deadline_s: float) -> None:
        self.current = {
            "round": round_,
            "selected": selected,
            "received": 0,
            "rejected": 0,
            "deadline": time.monotonic() + deadline_s,
        }
        self._refresh()

    def progress(self, received: int, rejected: int) -> None:
        if self.current is not None:
            self.current.update(received=received, rejected=rejected)
            self._refresh()

    def close_round(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.current = None
        self._refresh()

    def status_line(self) -> str:
        if self.current is None:
            return "waiting for clients..."
        c = self.current
        left = max(0.0, c["deadline"] - time.monotonic())
        return (
            f"round {c['round']}/{self.rounds_total}: {c['received']}/{c['selected']} updates received, "
            f"{c['rejected']} rejected, {left:.0f}s left"
        )

    def _render(self):
        return Group(rounds_table(self.records[-15:], f"run '{self.run_id}'"), Text(self.status_line()))

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())
