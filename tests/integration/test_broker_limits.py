"""Size limits against a real Mosquitto 2 configured with `max_packet_size`, as a managed broker caps a publish.

paho-mqtt does not enforce the broker's limit: Mosquitto drops the connection on an oversize packet,
paho reconnects and resends the QoS 1 message, forever. The toolkit refuses such a message locally and
sends anything larger than the limit as chunks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import numpy as np
import pytest

from coordinator.main import build_coordinator
from flora.protocol import Envelope, Topics, adapter_from_body, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.transport import Message, TransportError
from flora.transport.chunked import ChunkingTransport
from flora.transport.mqtt import MqttTransport
from tests.brokers import mosquitto_broker
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

LIMIT = 65_536
TOPICS = Topics("limits")


def capped_broker(limit: int):
    if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
        pytest.fail("mosquitto is not installed: run .ci/run or `apt-get install mosquitto`")
    return mosquitto_broker(extra_config=f"max_packet_size {limit}\n")


@pytest.fixture
def broker_64k():
    with capped_broker(LIMIT) as broker:
        yield broker


def big_update(megabytes: float = 3.0) -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    rows = int(megabytes * 1024 * 1024 / 4 / 512 / 2)
    tensors = {
        f"layer.{i}.lora_{ab}.weight": rng.normal(size=(rows, 512)).astype(np.float32) for i in range(2) for ab in "AB"
    }
    body, meta = adapter_to_body(tensors)
    env = Envelope(kind="update", run="limits", sender="node-1", round=1, body=body, body_meta=meta)
    return envelope_to_bytes(env), tensors


def chunking(url: str, node: str, limit: int | None = LIMIT) -> ChunkingTransport:
    transport = ChunkingTransport(MqttTransport(url, node, max_message_bytes=limit), limit)
    transport.connect()
    return transport


def test_a_multi_megabyte_adapter_goes_through_a_broker_capped_at_64_kb(broker_64k):
    payload, tensors = big_update(3.0)
    assert len(payload) > 3_000_000
    receiver = chunking(broker_64k.url, "coordinator", limit=None)  # no limit of its own: still reassembles
    receiver.subscribe(TOPICS.all_updates)
    sender = chunking(broker_64k.url, "node-1")
    try:
        sender.publish(Message(TOPICS.update("node-1"), payload), timeout=30)
        got = receiver.receive(timeout=60)
    finally:
        sender.close()
        receiver.close()
    assert got is not None and got.topic == TOPICS.update("node-1") and got.payload == payload
    env = envelope_from_bytes(got.payload)
    back = adapter_from_body(env.body, env.body_meta)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    assert receiver.reassembler.stats["completed"] == 1 and receiver.reassembler.pending == 0


def test_a_retained_chunked_instruction_reaches_a_client_that_subscribes_later(broker_64k):
    payload, _ = big_update(0.5)
    coordinator = chunking(broker_64k.url, "coordinator")
    coordinator.publish(Message(TOPICS.instruction, payload, retain=True), timeout=30)
    late = chunking(broker_64k.url, "late-client")
    try:
        late.subscribe(TOPICS.instruction)
        got = late.receive(timeout=30)
        assert got is not None and got.payload == payload
        # The small "finished" replaces it, and the old chunk slots are cleared: a later client gets only that.
        finished = envelope_to_bytes(Envelope(kind="finished", run="limits", sender="coordinator", round=1))
        coordinator.publish(Message(TOPICS.instruction, finished, retain=True))
        later = chunking(broker_64k.url, "later-client")
        later.subscribe(TOPICS.instruction)
        assert later.receive(timeout=30).payload == finished
        assert later.receive(timeout=0.5) is None and later.reassembler.pending == 0
        later.close()
    finally:
        coordinator.close()
        late.close()


def test_an_oversize_message_is_refused_locally_with_a_clear_error_instead_of_looping(broker_64k):
    payload, _ = big_update(0.1)
    transport = MqttTransport(broker_64k.url, "node-1", max_message_bytes=LIMIT)
    transport.connect()
    try:
        with pytest.raises(TransportError) as info:
            transport.publish(Message(TOPICS.update("node-1"), payload), timeout=30)
        assert "over the 65536-byte max_message_bytes" in str(info.value) and "chunks it" in str(info.value)
        assert transport.connected  # nothing was sent, so the broker did not drop us
        transport.publish(Message(TOPICS.update("node-1"), b"small"), timeout=30)  # and the connection still works
    finally:
        transport.close()


def test_without_the_local_check_the_broker_drops_the_client_and_the_publish_is_never_acknowledged(broker_64k, caplog):
    # Why the check exists. Bounded: we stop waiting after 3 s; paho would go on resending forever.
    payload, _ = big_update(0.1)
    transport = MqttTransport(broker_64k.url, "node-1")  # no max_message_bytes
    transport.connect()
    try:
        # "did not acknowledge" or "unreachable", depending on where in its reconnect loop paho is at the bound.
        with caplog.at_level(logging.WARNING), pytest.raises(TransportError, match=r"acknowledge|unreachable"):
            transport.publish(Message(TOPICS.update("node-1"), payload), timeout=3)
    finally:
        transport.close()
    assert any("lost the broker" in r.getMessage() for r in caplog.records)


def test_a_federation_runs_through_a_broker_that_refuses_packets_over_32_kb(
    tmp_path, tiny_model_dir, digits, digits_split, test_folder
):
    # The tiny model's float32 adapter is ~87 KB: the instruction and the float32 update travel as chunks.
    limit = 32_768
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=100)
    with capped_broker(limit) as broker:
        config = coordinator_config(
            tmp_path, tiny_model_dir, broker.url, test_folder, clients=2, rounds=1, max_message_bytes=limit
        )
        coordinator = build_coordinator(config)
        coordinator.start()
        plain, compact = client_configs(tmp_path, tiny_model_dir, broker.url, data_dirs)
        clients = [
            dataclasses.replace(plain, max_message_bytes=limit),
            dataclasses.replace(
                compact, max_message_bytes=limit, wire_encoding="int8-channel", wire_compression="zstd"
            ),
        ]
        agents, threads = start_agents(clients)
        try:
            report = coordinator.run()
        finally:
            for t in threads:
                t.join(30)
    (record,) = report["rounds"]
    assert record["participants"] == 2 and report["rejections"] == {}
    assert [a.rounds_trained for a in agents] == [1, 1]
    assert coordinator.transport.reassembler.stats["completed"] >= 1  # the float32 update came in chunks
