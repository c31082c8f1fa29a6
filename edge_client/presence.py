"""When a client answers a presence request (docs/PROTOCOL.md §5.7): at once, but at most once per interval.

A presence request asks every client of a run to publish its status. Anyone who can publish on the run's
presence topic can send one (the reply is harmless, so it is not required to be signed), so a flood of
requests must not make the device flood the broker: requests within `min_interval_s` of the last answer
are folded into one answer at the end of the interval.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_MIN_INTERVAL_S = 5.0


class PresenceReplies:
    def __init__(self, min_interval_s: float = DEFAULT_MIN_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._last_answer: float | None = None
        self._owed = False
        self.last_request: str | None = None  # its msg_id, echoed in the status as `answers`
        self.requests = 0  # received, answered or folded
        self.answers = 0

    def requested(self, msg_id: str) -> None:
        self.requests += 1
        self.last_request = msg_id[:64]
        self._owed = True

    def answered(self) -> None:
        """A status went out (an answer, or any other status: it tells the coordinator the same)."""
        self._last_answer = self.clock()
        self._owed = False

    def due(self) -> bool:
        """Whether to publish an answer now."""
        if not self._owed:
            return False
        return self._last_answer is None or self.clock() >= self._last_answer + self.min_interval_s

    def take(self) -> bool:
        """`due()`, and if so count the answer as sent."""
        if not self.due():
            return False
        self.answers += 1
        self.answered()
        return True
