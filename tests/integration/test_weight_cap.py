"""One device claiming 10^9 examples cannot take over FedAvg (issue 10, item 5), over a real Mosquitto.

Three real clients; the third holds only two digit classes. In one run it reports its true count; in the other
it claims 10^9 examples in every update (its status announces the truth, as the reference client's does). The
coordinator caps the claim at the announced dataset_size, so both runs aggregate the same weights and end at
the same accuracy. Before the cap, the liar's model replaced the global one: 47% fell to 20% (its two classes).
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.main import build_coordinator
from flora.data.datasets import write_image_folder
from flora.protocol import envelope_from_bytes, envelope_to_bytes
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

LIAR = 2  # index of the client that lies


def lie_about_examples(agent, claimed: int) -> None:
    """The agent trains honestly, then rewrites num_examples in every update it publishes."""
    publish = agent._publish_update

    def publish_lie(payload: bytes) -> None:
        env = envelope_from_bytes(payload)
        env.data["num_examples"] = claimed
        publish(envelope_to_bytes(env))

    agent._publish_update = publish_lie


def federate(tmp_path, broker_url, model_dir, data_dirs, test_folder, *, liar: bool):
    run_dir = tmp_path / ("liar" if liar else "honest")
    run_id = run_dir.name
    config = coordinator_config(
        run_dir, model_dir, broker_url, test_folder, clients=len(data_dirs), rounds=6, run_id=run_id
    )
    coordinator = build_coordinator(config)
    coordinator.start()
    agents, threads = start_agents(client_configs(run_dir, model_dir, broker_url, data_dirs, run_id=run_id), 300)
    if liar:
        lie_about_examples(agents[LIAR], 10**9)
    try:
        return coordinator.run()
    finally:
        for t in threads:
            t.join(60)


def test_a_client_claiming_a_billion_examples_weighs_what_it_announced(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=200)
    narrow = train_idx[np.isin(digits.labels[train_idx], [0, 1])][:200]  # a device that only ever saw 0s and 1s
    data_dirs.append(write_image_folder(digits.subset(narrow), tmp_path / "data-narrow"))
    args = (tmp_path, mosquitto.url, tiny_model_dir, data_dirs, test_folder)

    honest = federate(*args, liar=False)
    lied = federate(*args, liar=True)

    assert honest["final_accuracy"] > honest["initial_accuracy"] + 0.05  # the federation learns at all
    assert abs(lied["final_accuracy"] - honest["final_accuracy"]) <= 0.01, (
        honest["final_accuracy"],
        lied["final_accuracy"],
    )
    assert [r["weights_capped"] for r in lied["rounds"]] == [["client-2"]] * 6
    assert [r["num_examples"] for r in lied["rounds"]] == [r["num_examples"] for r in honest["rounds"]]
    assert all(r["weights_capped"] == [] for r in honest["rounds"])
