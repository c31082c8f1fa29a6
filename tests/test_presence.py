"""Presence requests (protocol 1.2): the coordinator re-learns who is online, clients answer within a rate limit."""

from __future__ import annotations

import pytest

from coordinator.presence import PresenceCheck
from coordinator.registry import Registry
from edge_client.presence import PresenceReplies
from flora.data.datasets import write_image_folder
from flora.errors import ProtocolError
from flora.protocol import Envelope, Topics, envelope_from_bytes, envelope_to_bytes
from flora.protocol.schema import check_data
from flora.transport import MemoryBroker, MemoryTransport, Message
from tests.integration.helpers import client_configs


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def online_registry(*nodes: str) -> Registry:
    registry = Registry()
    for node in nodes:
        registry.update(node, {"state": "online", "recipe": "paper"})
    return registry


def test_nodes_that_do_not_answer_are_not_offered_and_then_counted_offline():
    clock = Clock()
    registry = online_registry("a", "b", "c")
    check = PresenceCheck(registry, timeout_s=10, clock=clock)
    check.begin("req-1", "reconnected")
    assert registry.online() == []  # nothing is trusted from before the request

    check.heard("a", retained=False)  # a live status: an answer
    check.heard("b", retained=True)  # the broker's stored copy from before: not an answer
    check.heard("c", retained=True, answers="req-1")  # stored, but it echoes this request: an answer
    assert registry.online() == ["a", "c"]

    clock.now += 9.9
    assert check.expire_due() == [] and check.open
    clock.now += 0.2
    assert check.expire_due() == ["b"]
    assert registry.nodes["b"].state == "offline" and registry.online() == ["a", "c"]
    assert not check.open and check.expired == 1

    registry.update("b", {"state": "online"})  # it comes back by announcing itself, as any node
    assert registry.online() == ["a", "b", "c"]


def test_a_retained_status_arriving_during_a_check_does_not_make_a_node_eligible():
    # After a reconnect: the request goes out, then the broker delivers the stored statuses of devices that may be dead.
    registry = Registry()
    check = PresenceCheck(registry, timeout_s=10, clock=Clock())
    check.begin("req-1", "coordinator started")
    registry.update("stale", {"state": "online"})
    check.heard("stale", retained=True, answers="req-0")  # it answered an earlier request, not this one
    assert registry.online() == []


def test_replies_are_rate_limited_and_a_flood_is_folded_into_one_answer():
    clock = Clock()
    replies = PresenceReplies(min_interval_s=5, clock=clock)
    replies.answered()  # the status the client published when it connected
    for i in range(1000):
        replies.requested(f"req-{i}")
        assert not replies.take()
    clock.now += 5
    assert replies.take() and not replies.take()
    assert (replies.requests, replies.answers, replies.last_request) == (1000, 1, "req-999")


def test_the_presence_kind_is_checked_as_untrusted_input():
    assert check_data("presence", {"reply_within_s": 30}) == {"reply_within_s": 30.0}
    assert check_data("presence", {"other": "ignored"}) == {}
    with pytest.raises(ProtocolError, match="reply_within_s"):
        check_data("presence", {"reply_within_s": 1e99})
    with pytest.raises(ProtocolError, match="answers"):
        check_data("status", {"state": "online", "answers": "x" * 65})


def test_a_client_answers_a_presence_request_with_its_status_once_per_interval(tmp_path, tiny_model_dir, digits):
    from edge_client.main import build_agent

    url = "memory://presence-agent"
    data_dir = write_image_folder(digits.subset(range(20)), tmp_path / "data")
    (config,) = client_configs(tmp_path, tiny_model_dir, url, [data_dir], run_id="presence")
    broker = MemoryBroker.named(url[len("memory://") :])
    observer = MemoryTransport(broker, "observer")
    observer.connect()
    topics = Topics("presence")
    observer.subscribe(topics.status(config.node_id))
    agent = build_agent(config, progress=False)
    clock = Clock()
    agent.presence = PresenceReplies(clock=clock)
    try:
        agent.start()
        requests = [
            Message(topics.presence, envelope_to_bytes(Envelope(kind="presence", run="presence", sender="coordinator")))
            for _ in range(50)
        ]
        for request in requests:
            agent.handle(request)
            agent.answer_presence_if_due()
        clock.now += 5
        agent.answer_presence_if_due()
        statuses = []
        while (message := observer.receive(timeout=0.5)) is not None:
            statuses.append(envelope_from_bytes(message.payload))
        # The status it announced itself with, then one answer for the 50 requests, naming the last of them.
        assert [env.data["state"] for env in statuses] == ["online", "online"]
        last_request = envelope_from_bytes(requests[-1].payload).msg_id
        assert "answers" not in statuses[0].data and statuses[1].data["answers"] == last_request
    finally:
        agent.stop()
        MemoryBroker._named.pop(url[len("memory://") :], None)
