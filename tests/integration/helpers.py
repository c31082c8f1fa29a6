"""Build a small federation (coordinator + client agents in threads) against a given broker."""

from __future__ import annotations

import threading
from pathlib import Path

from coordinator.config import CoordinatorConfig
from edge_client.config import ClientConfig
from flora.data.datasets import write_image_folder
from flora.data.partition import iid

TEMPLATE = "a photo of the digit {label}."


def stage_clients(tmp_path: Path, digits, train_idx, clients: int, per_client: int) -> list[Path]:
    parts = iid(digits.labels[train_idx], clients, seed=0)
    return [
        write_image_folder(digits.subset(train_idx[part[:per_client]]), tmp_path / f"data-{i}")
        for i, part in enumerate(parts)
    ]


def client_configs(tmp_path, model_dir, broker_url, data_dirs, run_id="itest") -> list[ClientConfig]:
    return [
        ClientConfig(
            node_id=f"client-{i}",
            model=str(model_dir),
            data_dir=d,
            run_id=run_id,
            broker_url=broker_url,
            recipe="both-towers",
            device="cpu",
            batch_size=32,
            state_dir=tmp_path / f"state-{i}",
            exit_when_finished=True,
            seed=i,
        )
        for i, d in enumerate(data_dirs)
    ]


def coordinator_config(tmp_path, model_dir, broker_url, test_dir, *, clients, rounds, run_id="itest", **extra):
    settings = dict(
        model=str(model_dir),
        run_id=run_id,
        broker_url=broker_url,
        recipe="both-towers",
        rounds=rounds,
        min_clients_per_round=clients,
        min_available_clients=clients,
        quorum=clients,
        round_deadline_s=60.0,
        wait_for_clients_s=60.0,
        local_epochs=2,
        learning_rate=5e-3,
        batch_size=32,
        prompt_template=TEMPLATE,
        checkpoint_dir=tmp_path / "ckpt",
        output_dir=tmp_path / "out",
        eval_data_dir=test_dir,
    )
    settings.update(extra)
    return CoordinatorConfig(**settings)


def start_agents(configs, max_seconds: float = 120.0):
    from edge_client.main import build_agent

    agents = [build_agent(c, progress=False) for c in configs]
    threads = [threading.Thread(target=a.run, kwargs={"max_seconds": max_seconds}, daemon=True) for a in agents]
    for t in threads:
        t.start()
    return agents, threads
