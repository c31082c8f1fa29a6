"""A federation across two bridged Mosquittos: clients on a site broker, the coordinator on the central one.

The bridge uses the topic lines of deploy/mosquitto/README.md §7, read from the README itself, and every node's
max_message_bytes is the minimum so that instructions and updates cross the bridge as chunks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coordinator.main import build_coordinator
from tests.brokers import bridged_mosquitto_brokers
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "README.md"
SMALLEST_PACKET = 4096  # max_message_bytes' minimum: the adapters go as chunks


def readme_bridge_topics() -> str:
    """The `topic ...` lines of the README's bridge example (after its "# flora bridge topics" marker)."""
    text = README.read_text()
    block = text[text.index("# flora bridge topics") :]
    block = block[: block.index("```")]
    lines = [line for line in block.splitlines() if line.startswith("topic ")]
    assert len(lines) >= 9, lines
    return "\n".join(lines) + "\n"


def test_a_run_completes_across_a_site_broker_bridged_to_the_central_one(
    tmp_path, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=100)
    central, site = bridged_mosquitto_brokers(readme_bridge_topics())
    with central, site:
        config = coordinator_config(
            tmp_path,
            tiny_model_dir,
            central.url,
            test_folder,
            clients=2,
            rounds=2,
            local_epochs=1,
            max_message_bytes=SMALLEST_PACKET,
        )
        coordinator = build_coordinator(config)
        configs = [
            dataclasses.replace(c, max_message_bytes=SMALLEST_PACKET)
            for c in client_configs(tmp_path, tiny_model_dir, site.url, data_dirs)
        ]
        agents, threads = start_agents(configs)  # before the coordinator: found through the bridge
        try:
            report = coordinator.run()
        finally:
            for t in threads:
                t.join(60)
    assert [r["participants"] for r in report["rounds"]] == [2, 2]
    assert [a.rounds_trained for a in agents] == [2, 2]
    # The updates crossed the bridge in chunks, and so did the instructions the other way.
    assert coordinator.transport.reassembler.stats["completed"] >= 4
    assert all(a.transport.reassembler.stats["completed"] >= 2 for a in agents)
