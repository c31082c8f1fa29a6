"""Fleet faults against a real Mosquitto: a poisoning client, and 30% of clients killed mid-round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from coordinator.events import RoundStarted
from coordinator.main import build_coordinator
from flora.config import to_toml
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

CLIENTS = 10


def poison(agent, factor: float = 100.0):
    """Make one real agent malicious: it sends global + factor x (its honest change)."""
    honest = agent.trainer.train_round

    def train_round(global_adapter, settings, round_, **kwargs):
        tensors, metrics = honest(global_adapter, settings, round_, **kwargs)
        return {k: global_adapter[k] + factor * (v.numpy() - global_adapter[k]) for k, v in tensors.items()}, metrics

    agent.trainer.train_round = train_round


def federate(tmp_path, broker_url, model_dir, data_dirs, test_folder, *, strategy, params=None, attacker=False):
    run_dir = tmp_path / f"{strategy}-{'poisoned' if attacker else 'clean'}"
    config = coordinator_config(
        run_dir,
        model_dir,
        broker_url,
        test_folder,
        clients=CLIENTS,
        rounds=6,  # measured: 6 rounds lift the clean run to ~44%, where a 2-point margin is meaningful
        local_epochs=2,
        strategy=strategy,
        strategy_params=params or {},
        run_id=run_dir.name.replace("_", "-"),
    )
    coordinator = build_coordinator(config)
    coordinator.start()
    agents, threads = start_agents(client_configs(run_dir, model_dir, broker_url, data_dirs, run_id=config.run_id))
    if attacker:
        poison(agents[0])
    try:
        return coordinator.run()["final_accuracy"]
    finally:
        for t in threads:
            t.join(60)


def test_trimmed_mean_shrugs_off_a_client_scaling_its_update_100x(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=CLIENTS, per_client=100)
    args = (tmp_path, mosquitto.url, tiny_model_dir, data_dirs, test_folder)
    clean = federate(*args, strategy="trimmed_mean", params={"trim_fraction": 0.1})
    robust = federate(*args, strategy="trimmed_mean", params={"trim_fraction": 0.1}, attacker=True)
    naive = federate(*args, strategy="fedavg", attacker=True)
    assert clean > 0.2  # it learned at all (10% is chance)
    assert abs(robust - clean) <= 0.02
    assert naive < clean - 0.05  # the attack is real: plain FedAvg is hurt by it


def test_round_completes_at_the_deadline_when_30_percent_of_clients_are_killed(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=CLIENTS, per_client=60)
    configs = client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs)
    victims, survivors = configs[:3], configs[3:]
    config = coordinator_config(
        tmp_path,
        tiny_model_dir,
        mosquitto.url,
        test_folder,
        clients=CLIENTS,
        rounds=1,
        local_epochs=1,
        quorum=7,
        round_deadline_s=20.0,
    )
    # The victims are real OS processes, so they can really be killed (-9: no clean disconnect).
    processes = []
    for victim in victims:
        path = tmp_path / f"{victim.node_id}.toml"
        path.write_text(to_toml(victim))
        with open(tmp_path / f"{victim.node_id}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "flora.app", "client", "--config", str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
            )
    coordinator = build_coordinator(config)
    killed = threading.Event()

    def kill_victims_once_selected(event) -> None:
        # Emitted after the round's selection and before its instruction goes out: the victims were chosen
        # while online and die (-9: no clean disconnect) before they can answer, whatever the machine's speed.
        if isinstance(event, RoundStarted) and event.round == 1 and not killed.is_set():
            for proc in processes:
                proc.send_signal(signal.SIGKILL)
            killed.set()

    coordinator.events.subscribe(kill_victims_once_selected, required=True)
    _agents, threads = start_agents(survivors)
    try:
        report = coordinator.run()
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for t in threads:
            t.join(30)
    assert killed.is_set()
    (record,) = report["rounds"]
    assert record["selected"] == CLIENTS and record["participants"] == 7
    assert sorted(record["accepted"]) == sorted(c.node_id for c in survivors)
    assert np.isfinite(record["accuracy"])
