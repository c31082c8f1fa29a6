"""A logger for what the network makes us drop: one line per kind of drop per interval, the rest counted.

Every drop of a hostile message is worth knowing about, but a flood of them must not become a flood of log
lines (disk, journald, the operator's terminal). Each call names a `kind` (a fixed string such as "evicted",
never something a sender chooses, so the set of kinds stays small); the first line of a kind in an interval
is logged, the following ones are counted, and the next line logged for that kind says how many were not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 10.0


class ThrottledLog:
    def __init__(self, name: str, interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.logger = logging.getLogger(name)
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}  # kind -> when a line of that kind was last logged
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()  # roles log from their own thread; tests may share a module's instance

    def log(self, level: int, kind: str, message: str, *args) -> bool:
        """Log `message % args` unless a line of `kind` was logged within the interval; True if logged."""
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {self.interval_s:.0f}s, not logged)"
        self.logger.log(level, message, *args)
        return True

    def warning(self, kind: str, message: str, *args) -> bool:
        return self.log(logging.WARNING, kind, message, *args)

    def error(self, kind: str, message: str, *args) -> bool:
        return self.log(logging.ERROR, kind, message, *args)
