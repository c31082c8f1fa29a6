"""The dashboard's broker observer: one thread that subscribes read-only and feeds DashboardState.

It publishes nothing (no Will either) and uses a clean session with its own client id, like `flora status`,
so it leaves no trace on the broker. It does not go through ChunkingTransport: reassembling chunks would
mean holding whole adapters, and the dashboard needs only headers (see state.py for how chunked
instructions and updates are still read). paho reconnects by itself; the retained messages arrive again
then, and DashboardState ignores what it already has.
"""

from __future__ import annotations

import logging
import threading
import uuid

from flora.app.dashboard.state import DashboardState
from flora.protocol.topics import ROOT
from flora.transport import connect_transport
from flora.transport.base import RECONNECTED

log = logging.getLogger(__name__)

TOPIC_FILTERS = (
    f"{ROOT}/+/status/+",
    f"{ROOT}/+/metrics",
    f"{ROOT}/+/instruction",
    f"{ROOT}/+/instruction/chunk/0",  # the first chunk of a large instruction holds its header
    f"{ROOT}/+/update/+",  # headers only: who answered the open round
)


class BrokerObserver:
    def __init__(self, broker_url: str, state: DashboardState, *, ca_file: str | None = None):
        self.state = state
        self.client_id = f"flora-dashboard-{uuid.uuid4().hex[:12]}"
        self._transport = connect_transport(broker_url, self.client_id, clean_session=True, ca_file=ca_file)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="flora-dashboard-observer", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Connect (raising TransportError with the reason when the broker is unreachable or refuses us),
        subscribe, and start reading in the background."""
        self._transport.connect(timeout=timeout)
        for topic_filter in TOPIC_FILTERS:
            self._transport.subscribe(topic_filter, qos=1)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def connected(self) -> bool:
        return self._transport.connected

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._transport.receive(timeout=0.2)
                if message is not None and message.topic != RECONNECTED:
                    self.state.handle(message.topic, message.payload)
            except Exception:  # never let one message end the view; DashboardState.handle does not raise anyway
                log.exception("dashboard observer: message dropped")

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._transport.close()
