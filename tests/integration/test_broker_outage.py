"""Broker outages with no supervisor: both roles wait through them and re-learn who is online afterwards.

A 45 s outage (longer than any publish timeout the roles used to have) while a client trains and another while
the coordinator publishes the next instruction: the run completes, nothing exits. A broker restarted without
persistence loses the Last Will of a device that died meanwhile: the coordinator must not keep selecting it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest

from coordinator.events import InstructionPublished, ResultPublished, RoundStarted
from coordinator.main import build_coordinator
from flora.protocol import Envelope, Topics, envelope_from_bytes, envelope_to_bytes
from flora.transport.base import Message
from flora.transport.mqtt import MqttTransport
from tests.brokers import mosquitto_broker
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 45.0


class Outage:
    """Stops the broker once, keeps it down `seconds`, then starts it again on the same port with the same files
    (so with the same persistence setting). `down` is set once the broker is stopped. With `crash`, it is killed
    (SIGKILL): a broker shutting down cleanly publishes the Wills of the clients it disconnects, a crashed one
    publishes none."""

    def __init__(self, broker, seconds: float, *, crash: bool = False):
        self.broker, self.seconds, self.crash = broker, seconds, crash
        self.down, self.over = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def begin(self) -> None:
        with self._lock:
            if self.down.is_set():
                return
            if self.crash:
                self.broker.proc.kill()
                self.broker.proc.wait(10)
            else:
                self.broker._terminate()
            self.down.set()
        threading.Thread(target=self._restart_later, daemon=True).start()

    def _restart_later(self) -> None:
        time.sleep(self.seconds)
        self.broker.start()
        self.over.set()


def _fast_status(configs):
    """Clients that refresh their status every 2 s: during an outage that publish must wait, not end the agent."""
    return [dataclasses.replace(c, status_interval_s=2.0) for c in configs]


@pytest.mark.timeout(600)  # two 45 s outages, on a shared CI machine
def test_outages_during_training_and_the_next_instruction_complete_the_run(
    tmp_path, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=3, per_client=100)
    caplog.set_level(logging.WARNING, logger="flora.transport.mqtt")
    with mosquitto_broker(persistence=True) as broker:
        during_training, during_instruction = Outage(broker, OUTAGE_S), Outage(broker, OUTAGE_S)

        def after_round_one(event):
            if isinstance(event, ResultPublished) and event.round == 1:
                during_instruction.begin()  # round 2's selection and instruction go out while the broker is down

        config = coordinator_config(
            tmp_path,
            tiny_model_dir,
            broker.url,
            test_folder,
            clients=3,
            rounds=2,
            local_epochs=1,
            round_deadline_s=600.0,  # the outage must not be survived by giving up on the round
        )
        coordinator = build_coordinator(config, subscribers=[after_round_one])
        coordinator.start()
        configs = _fast_status(client_configs(tmp_path, tiny_model_dir, broker.url, data_dirs))
        agents, threads = start_agents(configs, max_seconds=540)
        honest = agents[0].trainer.train_round

        def train_round(global_adapter, settings, round_, **kwargs):
            if round_ == 1:
                during_training.begin()  # every client's update is sent into the outage
            return honest(global_adapter, settings, round_, **kwargs)

        agents[0].trainer.train_round = train_round
        try:
            report = coordinator.run()
        finally:
            for t in threads:
                t.join(120)
    assert during_training.over.is_set() and during_instruction.over.is_set()
    assert [(r["round"], r["participants"], r["attempts"]) for r in report["rounds"]] == [(1, 3, 1), (2, 3, 1)]
    assert [a.rounds_trained for a in agents] == [2, 2, 2]
    assert all(not t.is_alive() for t in threads), "an agent did not finish"
    waits = [r.getMessage() for r in caplog.records if "waiting to publish" in r.getMessage()]
    assert waits, "no publish said it was waiting for the broker"
    assert any("bytes queued" in line for line in waits)


class Ghost:
    """A device that answers presence requests until it dies with the broker (no DISCONNECT, so only its Last
    Will could say it is gone, and a broker without persistence loses that Will when it restarts)."""

    def __init__(self, url: str, run_id: str, node: str = "ghost"):
        self.topics, self.node = Topics(run_id), node
        self.transport = MqttTransport(url, node)
        self.alive = threading.Event()
        self.alive.set()

    def _status(self, state: str) -> Message:
        data = {"state": state, "recipe": "both-towers", "capabilities": {"dataset_size": 100}}
        env = Envelope(kind="status", run=self.topics.run, sender=self.node, data=data)
        return Message(self.topics.status(self.node), envelope_to_bytes(env), retain=True)

    def start(self) -> None:
        self.transport.connect(will=self._status("offline"))
        self.transport.subscribe(self.topics.presence)
        self.transport.publish(self._status("online"))
        threading.Thread(target=self._answer, daemon=True).start()

    def _answer(self) -> None:
        while self.alive.is_set():
            message = self.transport.receive(timeout=0.2)
            if message is not None and message.payload and envelope_from_bytes(message.payload).kind == "presence":
                self.transport.publish(self._status("online"), timeout=5)

    def die(self) -> None:
        """While the broker is down: stop for good, without reconnecting or disconnecting."""
        self.alive.clear()
        self.transport._client.loop_stop()


def test_after_a_restart_without_persistence_a_dead_device_is_not_selected_again(
    tmp_path, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=3, per_client=100)
    with mosquitto_broker(persistence=False) as broker:
        config = coordinator_config(
            tmp_path,
            tiny_model_dir,
            broker.url,
            test_folder,
            clients=3,  # selects every eligible node, once 3 are
            quorum=2,
            rounds=2,
            local_epochs=1,
            round_deadline_s=25.0,  # round 1 waits this long for the ghost it selected
            presence_timeout_s=5.0,
        )
        ghost = Ghost(broker.url, config.run_id)
        outage = Outage(broker, 5.0, crash=True)  # no Will is published, and none survives the restart
        selections: list[tuple[int, tuple[str, ...]]] = []
        online_before: list[str] = []

        def on_event(event):
            if isinstance(event, RoundStarted):
                selections.append((event.round, event.selected))
            if isinstance(event, InstructionPublished) and event.round == 1:
                online_before.extend(coordinator.registry.online())
                outage.begin()
                ghost.die()  # it dies during the outage: its Will is lost with the broker's memory

        ghost.start()
        coordinator = build_coordinator(config, subscribers=[on_event])
        coordinator.start()  # the ghost answers its presence request first
        agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, broker.url, data_dirs), max_seconds=280)
        try:
            report = coordinator.run()
        finally:
            for t in threads:
                t.join(120)
    assert outage.over.is_set()
    assert "ghost" in online_before and "ghost" in selections[0][1]  # alive then, and it answered
    later = [selected for round_, selected in selections if round_ >= 2]
    assert later and all("ghost" not in selected for selected in later), selections
    assert report["rounds"][-1]["participants"] == 3
    assert [a.state.last_round_trained for a in agents] == [2, 2, 2]
