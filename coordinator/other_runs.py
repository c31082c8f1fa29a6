"""Devices online under another run id, so that "only N of M clients came online" can name them.

A device configured with the wrong run_id publishes its status under another run's topics, where a coordinator
that reads only its own run never sees it: both sides wait, and nothing says why. The coordinator also reads the
statuses of every run (`flora/v1/+/status/+`) and keeps, per node, the run it announced itself in, bounded: a
shared broker may carry many runs, and an open one anything a sender makes up.
"""

from __future__ import annotations

from collections import OrderedDict

from flora.protocol import Envelope
from flora.throttled_log import ThrottledLog

log = ThrottledLog("coordinator.server")  # an open broker's made-up nodes must not flood the log

MAX_TRACKED = 256  # nodes remembered; the oldest is forgotten first (only the log and the failure use them)


class OtherRuns:
    def __init__(self, run_id: str, max_tracked: int = MAX_TRACKED):
        self.run_id = run_id
        self.max_tracked = max_tracked
        self.nodes: OrderedDict[str, str] = OrderedDict()  # node -> the other run it is online in

    def heard(self, env: Envelope) -> None:
        """A status published under another run: remember an online client there, forget one gone offline."""
        data = env.data if isinstance(env.data, dict) else {}
        if env.run == self.run_id or data.get("role") == "coordinator":
            return
        if data.get("state") != "online":
            if self.nodes.get(env.sender) == env.run:
                del self.nodes[env.sender]
            return
        if self.nodes.get(env.sender) != env.run:
            log.warning(
                "other run",
                "node %s is online in run %r, not in this run %r: if it belongs to this run, set run_id = %r in "
                "its client config",
                env.sender,
                env.run,
                self.run_id,
                self.run_id,
            )
        self.nodes[env.sender] = env.run
        self.nodes.move_to_end(env.sender)
        while len(self.nodes) > self.max_tracked:
            self.nodes.popitem(last=False)

    def joined(self, node: str) -> None:
        """The node announced itself in this run after all."""
        self.nodes.pop(node, None)

    def summary(self, limit: int = 10) -> str:
        shown = [f"{node} (run {run!r})" for node, run in list(self.nodes.items())[:limit]]
        more = len(self.nodes) - len(shown)
        return ", ".join(shown) + (f" and {more} more" if more > 0 else "")
