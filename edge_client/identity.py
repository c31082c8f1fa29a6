"""Is another device using this node_id? (A cloned SD card: two processes, one id, one broker.)

Two MQTT clients with one client id take over each other's session: the broker disconnects the older when the
newer connects, the older reconnects and disconnects the newer, and so on forever, with nothing in either log
but "Unspecified error". Two signs tell it, and each device sees both:

- every status this agent publishes carries its `instance` (a random id per process, protocol 1.2), and the agent
  reads its own node's status topic: an `online` status from another instance, sent after this process started,
  is another live process with our id (a restart of this device leaves only statuses sent before it started);
- reconnects that come right after connecting, again and again.

Either is logged as an error naming the node id and the fix, at most once a minute.
"""

from __future__ import annotations

import collections
import logging
import time

from flora.errors import ProtocolError
from flora.protocol import envelope_from_bytes

log = logging.getLogger(__name__)

FLAPS = 3  # reconnects within FLAP_WINDOW_S that count as being pushed off the broker
FLAP_WINDOW_S = 60.0
REPEAT_S = 60.0  # say it again at most this often while it lasts
CLOCK_SLACK_S = 5.0  # a status sent this long before we started still counts (two devices' clocks differ)


class DeviceIdentity:
    def __init__(self, node_id: str, instance: str):
        self.node_id = node_id
        self.instance = instance
        self.started_at = time.time()
        self._reconnects: collections.deque[float] = collections.deque(maxlen=FLAPS)
        self._last_said = float("-inf")
        self.duplicate_seen = False

    def saw_status(self, payload: bytes) -> None:
        """A message on our own node's status topic (never raises: it comes off the network)."""
        if not payload:
            return
        try:
            env = envelope_from_bytes(payload)
        except ProtocolError:
            return
        data = env.data if isinstance(env.data, dict) else {}
        other = data.get("instance")
        if env.kind != "status" or env.sender != self.node_id or not isinstance(other, str) or other == self.instance:
            return
        fresh = isinstance(env.sent_at, (int, float)) and env.sent_at >= self.started_at - CLOCK_SLACK_S
        if data.get("state") == "online" and fresh:
            self._say(
                f"another device is announcing itself online as {self.node_id} (its instance {other[:16]!r}, "
                f"this one is {self.instance!r})"
            )

    def reconnected(self) -> None:
        now = time.monotonic()
        self._reconnects.append(now)
        if len(self._reconnects) == FLAPS and now - self._reconnects[0] < FLAP_WINDOW_S:
            self._say(f"the broker dropped this device {FLAPS} times in {now - self._reconnects[0]:.0f}s")

    def _say(self, what: str) -> None:
        self.duplicate_seen = True
        if time.monotonic() - self._last_said < REPEAT_S:
            return
        self._last_said = time.monotonic()
        log.error(
            "%s: another device is using node_id %s? Two devices with one id take over each other's broker session "
            "and reconnect forever (a cloned SD card keeps the id). Give each device its own node_id "
            "(flora provision NEW_ID, then set node_id in its config)",
            what,
            self.node_id,
        )
