"""Protocol version negotiation: a peer on another major version is refused, loudly, on both sides.

Real agent and coordinator (tiny model) over the in-memory broker; the other side is a raw transport
that writes version "2.0" envelopes, as a newer release would.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.main import build_coordinator
from coordinator.server import RoundFailed
from edge_client.config import ClientConfig
from edge_client.main import build_agent
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_to_bytes
from flora.transport import MemoryBroker, MemoryTransport, Message
from tests.integration.helpers import stage_clients

RUN = "versions"


def v2(kind: str, sender: str, **fields) -> bytes:
    env = Envelope(kind=kind, run=RUN, sender=sender, **fields)
    env.version = "2.0"
    return envelope_to_bytes(env)


def raw_peer(broker_name: str, node: str) -> MemoryTransport:
    peer = MemoryTransport(MemoryBroker.named(broker_name), node)
    peer.connect()
    return peer


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def test_a_client_refuses_an_instruction_from_a_newer_major_version_and_says_how_to_fix_it(
    tmp_path, tiny_model_dir, digits, digits_split, caplog
):
    train_idx, _ = digits_split
    (data_dir,) = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=20)
    config = ClientConfig(
        node_id="client-0",
        model=str(tiny_model_dir),
        data_dir=data_dir,
        run_id=RUN,
        broker_url="memory://versions-client",
        recipe="both-towers",
        device="cpu",
        state_dir=tmp_path / "state",
    )
    agent = build_agent(config, progress=False)
    agent.start()
    body, meta = adapter_to_body({"w": np.zeros(2)})
    train = v2("train", "coordinator", round=1, data={"selected": ["client-0"]}, body=body, body_meta=meta)
    raw_peer("versions-client", "coordinator").publish(Message(Topics(RUN).instruction, train, retain=True))

    message = agent.transport.receive(timeout=5)
    while message is not None and message.topic != Topics(RUN).instruction:  # e.g. its own status (1.2)
        message = agent.transport.receive(timeout=5)
    with caplog.at_level(logging.WARNING):
        agent.handle(message)
    agent.stop()

    assert agent.rounds_trained == 0 and agent.state.last_round_trained == -1
    (line,) = errors(caplog)
    assert "incompatible_version" in line and "'coordinator' speaks protocol '2.0'" in line
    assert "upgrade the older side" in line


def test_a_coordinator_counts_and_reports_clients_on_another_major_version(tmp_path, tiny_model_dir, caplog):
    config = CoordinatorConfig(
        model=str(tiny_model_dir),
        run_id=RUN,
        broker_url="memory://versions-coordinator",
        recipe="both-towers",
        rounds=1,
        wait_for_clients_s=0.5,  # no compatible client will come: the round fails after this bound
        checkpoint_dir=tmp_path / "ckpt",
    )
    coordinator = build_coordinator(config)
    coordinator.start()
    peer = raw_peer("versions-coordinator", "client-9")
    topics = Topics(RUN)
    peer.publish(Message(topics.status("client-9"), v2("status", "client-9", data={"state": "online"}), retain=True))
    peer.publish(Message(topics.update("client-9"), v2("update", "client-9", round=1, data={"num_examples": 5})))

    with caplog.at_level(logging.WARNING), pytest.raises(RoundFailed, match="0 of 1 required eligible clients"):
        coordinator.run()

    assert coordinator.rejections["incompatible_version"] == 2  # its status and its update
    assert coordinator.registry.online(config.recipe) == []  # never counted as an available client
    lines = errors(caplog)
    assert len(lines) == 2 and all("'client-9' speaks protocol '2.0'" in line for line in lines)
