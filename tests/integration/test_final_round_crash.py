"""kill -9 the coordinator just after the final round's state write: the rerun repairs the outputs and publishes
the result (issue 11, item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from flora.config import to_toml
from flora.protocol import Topics, envelope_from_bytes
from flora.transport.mqtt import MqttTransport
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

# The coordinator, with one more subscriber: it kills its own process (SIGKILL: no handler, no flush) the moment
# the last round's state.json is written, before any output of that round is.
KILL_AT_LAST_CHECKPOINT = """
import os, signal, sys
from coordinator.config import load_coordinator_config
from coordinator.main import build_coordinator

config = load_coordinator_config(sys.argv[1])

def on_event(event):
    if type(event).__name__ == "CheckpointSaved" and event.round == config.rounds:
        os.kill(os.getpid(), signal.SIGKILL)

build_coordinator(config, subscribers=[on_event]).run()
"""


def test_kill_9_after_the_final_state_write_then_rerun(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=60)
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=2, rounds=2, local_epochs=1
    )
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(to_toml(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs), max_seconds=240)
    try:
        killed = subprocess.run(
            [sys.executable, "-c", KILL_AT_LAST_CHECKPOINT, str(config_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert killed.returncode == -9, killed.stderr[-3000:]
        checkpoint = tmp_path / "ckpt"
        assert json.loads((checkpoint / "state.json").read_text())["round"] == 2
        out = tmp_path / "out"
        plot_before = (out / "metrics.png").stat().st_mtime_ns

        rerun = subprocess.run(
            [sys.executable, "-m", "flora.app", "coordinator", "--config", str(config_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=240,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    finally:
        for t in threads:
            t.join(60)

    # Outputs equal the last checkpoint: the adapter bit for bit, the report with both rounds, the plot redrawn.
    final = load_file(str(checkpoint / "rounds" / "000002" / "adapter_model.safetensors"))
    published = load_file(str(out / "global_adapter" / "adapter_model.safetensors"))
    assert sorted(final) == sorted(published)
    for name in final:
        np.testing.assert_array_equal(final[name], published[name], err_msg=name)
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert (out / "metrics.png").stat().st_mtime_ns > plot_before

    # The result is published: the retained round result names round 2, the retained instruction says finished,
    # and the clients heard it (they exit when the run finishes).
    observer = MqttTransport(mosquitto.url, "observer")
    observer.connect()
    topics = Topics(config.run_id)
    observer.subscribe(topics.metrics)
    observer.subscribe(topics.instruction)
    retained = {}
    while len(retained) < 2:
        message = observer.receive(timeout=10)
        assert message is not None, f"only {sorted(retained)} retained"
        env_ = envelope_from_bytes(message.payload)
        retained[env_.kind] = env_
    observer.close()
    assert retained["round_result"].round == 2 and retained["finished"].round == 2
    assert all(a.finished for a in agents)
    assert [a.state.pending_round for a in agents] == [None, None]  # round 2's update was acknowledged
