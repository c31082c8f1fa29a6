"""The coordinator's live terminal view: finished rounds as a table, the open round as a status line.

Shown only when the coordinator's console is a terminal; under systemd or with output redirected
it stays silent and the log lines tell the same story. It follows the run as a subscriber to the
coordinator's events (coordinator/events.py).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from coordinator.events import (
    RoundEnded,
    RoundStarted,
    RunFailed,
    RunFinished,
    RunStarted,
    UpdateAccepted,
    UpdateRejected,
)
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

    # -- as a subscriber to the coordinator's events ---------------------------------------------------------------
    def on_run_started(self, event: RunStarted) -> None:
        self.records = [r.to_dict() for r in event.report.rounds]  # a resumed run shows its earlier rounds
        self.__enter__()

    def on_round_started(self, event: RoundStarted) -> None:
        self.open_round(event.round, len(event.selected), max(0.0, event.deadline - time.time()))

    def on_update_accepted(self, event: UpdateAccepted) -> None:
        if self.current is not None and self.current["round"] == event.round:
            self.progress(self.current["received"] + 1, self.current["rejected"])

    def on_update_rejected(self, event: UpdateRejected) -> None:
        if self.current is not None and self.current["round"] == event.round:
            self.progress(self.current["received"], self.current["rejected"] + 1)

    def on_round_ended(self, event: RoundEnded) -> None:
        self.close_round(event.record.to_dict())

    def on_run_finished(self, event: RunFinished) -> None:
        self.__exit__()

    def on_run_failed(self, event: RunFailed) -> None:
        self.__exit__()

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
