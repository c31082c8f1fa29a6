"""A real federation over a real Mosquitto 2 broker: coordinator + 3 client agents, 2 rounds."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.main import build_coordinator
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.transport import Message
from flora.transport.mqtt import MqttTransport
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def rogue_publisher(broker_url: str, run_id: str, stop: threading.Event):
    """Waits for round 1's instruction, then sends garbage, a wrong-shape update and a future-round update."""
    topics = Topics(run_id)
    rogue = MqttTransport(broker_url, "rogue")
    rogue.connect()
    rogue.subscribe(topics.instruction)
    try:
        while not stop.is_set():
            message = rogue.receive(timeout=0.2)
            if message is None or not message.payload:  # empty: the coordinator cleared a retained topic
                continue
            env = envelope_from_bytes(message.payload)
            if env.kind != "train" or env.round != 1:
                continue
            rogue.publish(Message(topics.update("client-0"), b"\x00garbage"))
            body, meta = adapter_to_body({"base_model.model.x.lora_A.weight": np.ones((3, 3))})
            wrong = Envelope(
                kind="update",
                run=run_id,
                sender="client-0",
                round=1,
                data={"num_examples": 5},
                body=body,
                body_meta=meta,
            )
            rogue.publish(Message(topics.update("client-0"), envelope_to_bytes(wrong)))
            future = Envelope(
                kind="update",
                run=run_id,
                sender="client-1",
                round=99,
                data={"num_examples": 5},
                body=body,
                body_meta=meta,
            )
            rogue.publish(Message(topics.update("client-1"), envelope_to_bytes(future)))
            return
    finally:
        rogue.close()


def test_two_rounds_with_three_clients_learn_and_survive_bad_messages(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=3, per_client=300)
    config = coordinator_config(tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=3, rounds=2)
    coordinator = build_coordinator(config)
    initial_adapter = coordinator.evaluator.initial_adapter()

    stop = threading.Event()
    rogue = threading.Thread(target=rogue_publisher, args=(mosquitto.url, config.run_id, stop), daemon=True)
    rogue.start()
    agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs))
    try:
        report = coordinator.run()
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    # Every round completed with all three real clients despite the rogue messages.
    assert [r["participants"] for r in report["rounds"]] == [3, 3]
    assert report["rejections"] == {"malformed": 1, "tensor_names_mismatch": 1, "wrong_round": 1}
    # It learned, measured on held-out data.
    assert report["final_accuracy"] > report["initial_accuracy"] + 0.05
    # Bytes were counted: each update carries the whole adapter, so at least its size per participant.
    adapter_bytes = sum(v.nbytes for v in initial_adapter.values())
    for record in report["rounds"]:
        assert record["bytes_up"] >= 3 * adapter_bytes
        assert record["bytes_down"] >= 3 * adapter_bytes
    # The adapter changed (LoRA B starts at zero) and was saved as a PEFT directory.
    saved = load_file(str(tmp_path / "out" / "global_adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(initial_adapter)
    assert max(float(np.abs(saved[k] - initial_adapter[k]).max()) for k in saved) > 1e-3
    # Clients finished: each trained each round exactly once and then exited.
    assert [a.rounds_trained for a in agents] == [2, 2, 2]
    assert all(not t.is_alive() for t in threads)
