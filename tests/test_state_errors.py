"""Damaged state on disk (a checkpoint, a client's progress) ends in one line naming the file and the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordinator.checkpoint import CheckpointStore
from edge_client.state import StateStore
from flora.errors import FloraError, StateError


@pytest.mark.parametrize("content", ['{"round": 3, "adapter_d', "[1, 2]", '{"round": "three", "adapter_dir": "x"}'])
def test_a_damaged_checkpoint_is_a_flora_error_naming_the_file(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(StateError, match=r"state\.json .*(move the checkpoint directory away)"):
        CheckpointStore(tmp_path).load()
    assert (tmp_path / "state.json").read_text() == content  # nothing rewritten


def test_a_checkpoint_naming_a_missing_adapter_is_refused(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"round": 2, "adapter_dir": "rounds/000002"}))
    with pytest.raises(StateError, match="000002, which is missing"):
        CheckpointStore(tmp_path).load()


@pytest.mark.parametrize("content", ['{"run_id": "r", "last_round', '{"run_id": "r", "last_round_trained": "5"}', "7"])
def test_damaged_client_state_is_a_flora_error_naming_the_file(tmp_path, content):
    (tmp_path / "state.json").write_text(content)
    with pytest.raises(FloraError, match=r"client state .*state\.json is corrupt .*delete it"):
        StateStore(tmp_path).load("r")


@pytest.mark.slow  # a CLI process that loads the model
def test_cli_reports_a_truncated_checkpoint_in_one_line(tmp_path, tiny_model_dir):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "state.json").write_text('{"round": 4, "adapter_dir": "rou')
    config = tmp_path / "coordinator.toml"
    config.write_text(
        f'model = "{tiny_model_dir}"\ncheckpoint_dir = "{checkpoints}"\nbroker_url = "mqtt://127.0.0.1:9"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "flora.app", "coordinator", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "state.json is corrupt" in errors[0] and "move the checkpoint directory" in errors[0]


@pytest.mark.parametrize("rounds", [[1, 3], [1, 2, 2], [2, 3, 4], [1]])
def test_a_history_that_is_not_rounds_1_to_n_is_refused(tmp_path, rounds):
    (tmp_path / "rounds" / "000003").mkdir(parents=True)
    (tmp_path / "rounds" / "000003" / "adapter_model.safetensors").write_bytes(b"")
    state = {"round": 3, "adapter_dir": "rounds/000003", "history": [{"round": r} for r in rounds]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(StateError, match=r"state\.json has round 3 but its history records rounds \[.*not 1 to 3"):
        CheckpointStore(tmp_path).load()


def test_a_contiguous_history_loads(tmp_path):
    (tmp_path / "rounds" / "000002").mkdir(parents=True)
    (tmp_path / "rounds" / "000002" / "adapter_model.safetensors").write_bytes(b"")
    state = {"round": 2, "adapter_dir": "rounds/000002", "history": [{"round": 1}, {"round": 2}]}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert CheckpointStore(tmp_path).load()["round"] == 2
