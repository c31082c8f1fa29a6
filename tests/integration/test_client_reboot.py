"""A client loses power after saving its finished update and before sending it; after the reboot it re-sends
that very update instead of training again, then joins the next round. Against a real Mosquitto."""

from __future__ import annotations

import threading

import pytest

from coordinator.main import build_coordinator
from edge_client.main import build_agent
from flora.protocol import Topics, envelope_from_bytes
from flora.transport.mqtt import MqttTransport
from tests.integration.helpers import client_configs, coordinator_config, stage_clients

pytestmark = pytest.mark.integration


class PowerCut(BaseException):
    """Not an Exception: nothing in the agent may catch it, as nothing runs after a power cut."""


class CutPowerBeforeUpdate:
    """The agent's transport, except that the moment the agent publishes an update the power goes."""

    def __init__(self, inner, update_topic: str):
        self._inner, self._update_topic = inner, update_topic

    def publish(self, message, *args, **kwargs):
        if message.topic == self._update_topic:
            raise PowerCut
        return self._inner.publish(message, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_a_rebooted_client_resends_its_unacknowledged_update_and_joins_the_next_round(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=96)
    (config,) = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    coordinator = build_coordinator(
        coordinator_config(tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=1, rounds=2, local_epochs=1)
    )
    topics = Topics(config.run_id)
    observer = MqttTransport(mosquitto.url, "observer")
    observer.connect()
    observer.subscribe(topics.update(config.node_id))
    coordinator.start()  # connected (stale retained state cleared) before the client joins
    result: dict = {}
    server = threading.Thread(target=lambda: result.update(report=coordinator.run()), daemon=True)
    server.start()
    try:
        # Boot 1: trains round 1, saves the update to the state directory, loses power before publishing it.
        first = build_agent(config, progress=False)
        first.transport = CutPowerBeforeUpdate(first.transport, topics.update(config.node_id))
        with pytest.raises(PowerCut):
            first.run(max_seconds=60)
        saved = (config.state_dir / "pending_update.bin").read_bytes()
        assert first.state.pending_round == 1 and first.state.last_round_trained == 1
        assert envelope_from_bytes(saved).round == 1
        assert observer.receive(timeout=1.0) is None  # nothing reached the broker

        # Boot 2: same settings, same state directory.
        second = build_agent(config, progress=False)
        trained: list[int] = []
        train_round = second.trainer.train_round

        def counting(adapter, settings, round_, **kwargs):
            trained.append(round_)
            return train_round(adapter, settings, round_, **kwargs)

        second.trainer.train_round = counting
        second.run(max_seconds=120)  # returns when the coordinator ends the run (exit_when_finished)
        server.join(60)
        sent = []
        while (message := observer.receive(timeout=0.5)) is not None:
            sent.append(message.payload)
    finally:
        observer.close()
    assert not server.is_alive() and "report" in result
    report = result["report"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert [r["accepted"] for r in report["rounds"]] == [[config.node_id], [config.node_id]]
    # Round 1 was trained once, before the power cut: the reboot re-sent those exact bytes and trained round 2 only.
    assert trained == [2] and second.rounds_trained == 1
    assert sent and sent[0] == saved
    assert second.state.last_round_trained == 2 and second.state.pending_round is None  # round 2 acknowledged
