"""Who is online, re-learned from the nodes themselves rather than from what the broker kept (PROTOCOL.md §5.7).

Retained statuses and Last Wills are the broker's memory, and it can lose or withhold it: a broker restarted
without persistence forgets the Wills of devices that died meanwhile (the coordinator would keep selecting
them), and RabbitMQ's MQTT plugin does not deliver retained messages to wildcard subscriptions at all (a
coordinator started after its clients would see none). So the coordinator publishes a presence request, and
every client of the run answers with a fresh status: at start only to find clients (server.py), and after
every reconnect as a check, kept here.

While a check is open, the nodes believed online only from before it (or from a retained status delivered
after it) are *unconfirmed*: the registry does not offer them for selection. A node confirms by any status
that was not a retained copy, or one that echoes the request's id. Those still unconfirmed when the check
times out are counted offline, with a logged reason; a later status of theirs brings them back, as for any
node. (A 1.0/1.1 client does not answer, but it re-announces itself when it reconnects, which confirms it.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from coordinator.registry import Registry

log = logging.getLogger(__name__)

# A client answers from its main thread, so one that is training answers when its training ends. It is counted
# offline meanwhile, which costs nothing: it is already selected for the round it trains in, and the update it
# sends is accepted as usual (selection, not presence, decides that), followed by a status that brings it back.


class PresenceCheck:
    def __init__(self, registry: Registry, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self.timeout_s = timeout_s
        self.clock = clock
        self.asked_at: float | None = None  # None: no check open
        self.request_id: str | None = None  # the open request's msg_id, which an answering status echoes
        self.expired = 0  # nodes counted offline for not answering, over the run

    @property
    def open(self) -> bool:
        return self.asked_at is not None

    def begin(self, request_id: str, why: str) -> None:
        """A presence request is being published: every node online so far must answer to stay eligible."""
        self.asked_at = self.clock()
        self.request_id = request_id
        believed = {info.node for info in self.registry.nodes.values() if info.state == "online"}
        self.registry.unconfirmed = believed
        log.info(
            "asked every client of the run for a fresh status (%s); %d node(s) believed online must answer "
            "within %.0f s",
            why,
            len(believed),
            self.timeout_s,
        )

    def heard(self, node: str, *, retained: bool, answers: str | None = None) -> None:
        """`node`'s status was applied to the registry. A live one, or one echoing the open request's id (some
        brokers and bridges keep the retain flag on live delivery), confirms it; a retained copy is from before."""
        if not self.open:
            return
        info = self.registry.nodes.get(node)
        if not retained or (answers is not None and answers == self.request_id):
            self.registry.unconfirmed.discard(node)
        elif info is not None and info.state == "online":
            self.registry.unconfirmed.add(node)

    def expire_due(self) -> list[str]:
        """Close the check once it timed out: the nodes that did not answer are counted offline."""
        if self.asked_at is None or self.clock() < self.asked_at + self.timeout_s:
            return []
        silent = sorted(node for node in self.registry.unconfirmed if node in self.registry.nodes)
        for node in silent:
            self.registry.nodes[node].state = "offline"
        self.registry.unconfirmed = set()
        self.asked_at = self.request_id = None
        self.expired += len(silent)
        if silent:
            shown = ", ".join(silent[:20]) + (f" and {len(silent) - 20} more" if len(silent) > 20 else "")
            log.warning(
                "%d node(s) did not answer the presence request within %.0f s and are counted offline until they "
                "announce themselves again: %s",
                len(silent),
                self.timeout_s,
                shown,
            )
        return silent
