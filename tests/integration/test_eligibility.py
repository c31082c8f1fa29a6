"""Mismatched devices are explained, on both sides; a reused run id and a duplicate node id are caught
(issue 11, item 4). Against a real Mosquitto."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import numpy as np
import pytest

from coordinator.main import build_coordinator
from coordinator.server import RoundFailed
from edge_client.state import ClientState, StateStore
from flora.errors import ConfigError
from flora.modeling.fingerprint import model_fingerprint
from flora.modeling.tiny import write_tiny_clip
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_to_bytes
from flora.transport import Message
from flora.transport.mqtt import MqttTransport
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@contextlib.contextmanager
def _a_failing_round(config, agent_configs, *, max_seconds: float, join_s: float):
    """Start the coordinator and the agents; yield the coordinator and the message of the RoundFailed its run
    must end in (the agents still running, to be questioned); then wait for the agents to stop."""
    coordinator = build_coordinator(config)
    coordinator.start()
    _, threads = start_agents(agent_configs, max_seconds=max_seconds)
    try:
        with pytest.raises(RoundFailed) as failed:
            coordinator.run()
        yield coordinator, str(failed.value)
    finally:
        for t in threads:
            t.join(join_s)


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_each_unusable_device_is_named_with_its_reason_on_both_sides(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=4, per_client=20)
    other_model = write_tiny_clip(tmp_path / "other-clip", seed=1)  # same shapes, other weights
    trained, recipe, rank, model = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    StateStore(trained.state_dir).save(ClientState(run_id=trained.run_id, last_round_trained=3))  # an earlier run's
    configs = [
        trained,
        dataclasses.replace(recipe, recipe="text-full"),
        dataclasses.replace(rank, lora_rank=4),  # FedAvg takes only the run's rank
        dataclasses.replace(model, model=str(other_model)),
    ]
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=4, rounds=1, wait_for_clients_s=20.0
    )
    with caplog.at_level(logging.INFO), _a_failing_round(config, configs, max_seconds=90, join_s=120) as failed:
        coordinator, message = failed
        # The coordinator names every online device it cannot use, in the log and in the failure.
        assert "only 0 of 4 required eligible clients came online" in message
        assert "client-0 (it already trained round 3 of run itest, past round 1" in message
        assert "client-1 (recipe 'text-full', the run's is 'both-towers'" in message
        assert "client-2 (LoRA rank 4, the run's is 8 (set lora_rank = 8" in message
        assert f"client-3 (base model fingerprint {model_fingerprint(str(other_model))}" in message
        logged = _messages(caplog, "is online but cannot take part in run itest")
        assert sorted(line.split()[1] for line in logged) == ["client-0", "client-1", "client-2", "client-3"]

        # Each device, shown the run's instruction, says why it does not take part.
        body, meta = adapter_to_body({k: np.asarray(v) for k, v in coordinator.global_tensors.items()})
        train = Envelope(
            kind="train",
            run=config.run_id,
            sender=config.node_id,
            round=1,
            data={
                "selected": ["client-0", "client-1", "client-2", "client-3"],
                "recipe": config.recipe,
                "rank": 8,
                "lower_rank_ok": False,
                "model_fingerprint": model_fingerprint(str(tiny_model_dir)),
            },
            body=body,
            body_meta=meta,
        )
        peer = MqttTransport(mosquitto.url, config.node_id)
        peer.connect()
        peer.publish(Message(Topics(config.run_id).instruction, envelope_to_bytes(train), retain=True))
        peer.close()
        told = {
            "client-0": "ignoring the instruction for round 1: this device already trained round 3 of run itest",
            "client-1": "the run uses recipe 'both-towers' but this device is configured for 'text-full'",
            "client-2": "this device trains at LoRA rank 4, the run's rank is 8 and its strategy takes no lower",
            "client-3": f"is not this device's model {other_model}",
        }
        _wait(lambda: all(_messages(caplog, text) for text in told.values()), 60, "every device to say why")


def test_a_fresh_coordinator_refuses_a_run_id_the_broker_has_results_of(tmp_path, mosquitto, tiny_model_dir):
    config = coordinator_config(tmp_path, tiny_model_dir, mosquitto.url, None, clients=1, rounds=2)
    earlier = Envelope(kind="round_result", run=config.run_id, sender=config.node_id, round=2, data={"round": 2})
    peer = MqttTransport(mosquitto.url, "earlier-coordinator")
    peer.connect()
    peer.publish(Message(Topics(config.run_id).metrics, envelope_to_bytes(earlier), retain=True))
    peer.close()
    coordinator = build_coordinator(config)
    with pytest.raises(ConfigError) as refused:
        coordinator.start()
    coordinator.transport.close()
    message = str(refused.value)
    assert "run_id 'itest' was used before: the broker keeps its result for round 2" in message
    assert "Start a new run with another run_id" in message and str(config.checkpoint_dir) in message


def test_two_devices_with_one_node_id_are_told_so(tmp_path, mosquitto, tiny_model_dir, digits, digits_split, caplog):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=20)
    first, second = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    clone = dataclasses.replace(second, node_id=first.node_id)  # a cloned SD card: same id, its own state
    with caplog.at_level(logging.ERROR, logger="edge_client.identity"):
        agents, threads = start_agents([first, clone], max_seconds=60)
        try:
            _wait(lambda: all(a.identity.duplicate_seen for a in agents), 50, "both devices to notice the clone")
        finally:
            for agent in agents:
                agent.finished = agent.config.exit_when_finished = True  # stop the loops
            for t in threads:
                t.join(60)
    assert _messages(caplog, "another device is using node_id client-0")


def test_a_device_configured_with_another_run_id_is_named_by_the_coordinator(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=20)
    right, wrong = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    wrong = dataclasses.replace(wrong, run_id="itest-typo")
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=2, rounds=1, wait_for_clients_s=15.0
    )
    with caplog.at_level(logging.INFO), _a_failing_round(config, [right, wrong], max_seconds=45, join_s=60) as failed:
        _, message = failed
        assert "only 1 of 2 required eligible clients came online" in message
        assert "online under another run id: client-1 (run 'itest-typo')" in message
        assert "set run_id = 'itest'" in message
        logged = _messages(caplog, "is online in run 'itest-typo', not in this run 'itest'")
        assert [line.split()[1] for line in logged] == ["client-1"]  # said once, not per status


def test_a_run_of_protocol_1_3_settings_leaves_out_a_device_of_1_2_and_trains_with_the_rest(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    # A device of protocol 1.2 would ignore round_epochs and optimizer and train whole epochs of AdamW at the run's
    # SGD learning rate: the coordinator must not select it, and must say why.
    train_idx, _ = digits_split
    (data_dir,) = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=40)
    (agent_config,) = client_configs(tmp_path, tiny_model_dir, mosquitto.url, [data_dir])
    settings = dict(local_epochs=0.5, client_optimizer="sgd", learning_rate=0.5, weight_decay=0.0)
    old = Envelope(kind="status", run="itest", sender="client-old", data={"state": "online"}, version="1.2")
    peer = MqttTransport(mosquitto.url, "client-old")
    peer.connect()
    peer.publish(Message(Topics("itest").status("client-old"), envelope_to_bytes(old), retain=True))
    peer.close()
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=2, rounds=1, wait_for_clients_s=15.0, **settings
    )
    with caplog.at_level(logging.INFO), _a_failing_round(config, [agent_config], max_seconds=40, join_s=60) as failed:
        _, message = failed
        assert "only 1 of 2 required eligible clients came online" in message
        assert (
            "client-old (it speaks protocol 1.2, and local_epochs = 0.5 and client_optimizer = 'sgd' needs 1.3 "
            "(upgrade flora-edge on it" in message
        )

    # With the 1.3 device alone the run trains: half an epoch of SGD a round.
    config = coordinator_config(
        tmp_path / "second", tiny_model_dir, mosquitto.url, test_folder, clients=1, rounds=2, run_id="itest2",
        **settings,
    )  # fmt: skip
    agent_config = dataclasses.replace(agent_config, run_id="itest2", state_dir=tmp_path / "second" / "state")
    coordinator = build_coordinator(config)
    coordinator.start()
    with caplog.at_level(logging.INFO):
        _, threads = start_agents([agent_config], max_seconds=120)
        report = coordinator.run()
        for t in threads:
            t.join(60)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    # 40 examples at batch 32 are 2 batches an epoch: half an epoch is one step, in each round.
    assert len(_messages(caplog, "sent update")) == 2 and len(_messages(caplog, " bytes, 1 step, loss")) == 2
