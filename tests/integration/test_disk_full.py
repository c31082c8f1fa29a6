"""The coordinator's disk fills up mid-run: one line naming the path and the fix, exit 2, and a rerun on a disk with
room completes the run from what was on disk (issue 11, item 6)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from flora.config import to_toml
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

# A file-size limit is a full disk that needs no root: a write past it fails with EFBIG ("File too large"), as a
# write past the free space fails with ENOSPC. 16 KB lets the start-up checks, the round's selection and
# the logs through, and stops the first checkpoint (the adapter is larger).
FILE_LIMIT = 16 * 1024


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))


def test_a_full_disk_at_the_checkpoint_ends_in_one_line_and_the_rerun_completes(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=1, per_client=60)
    config = coordinator_config(
        tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=1, rounds=1, local_epochs=1
    )
    config_path = tmp_path / "coordinator.toml"
    config_path.write_text(to_toml(config))
    argv = [sys.executable, "-m", "flora.app", "coordinator", "--config", str(config_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    _, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs), max_seconds=240)
    try:
        full = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240, preexec_fn=_limit_file_size)
        assert full.returncode == 2, full.stderr[-3000:]
        assert "Traceback" not in full.stderr, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1, full.stderr[-3000:]
        assert f"cannot write {tmp_path / 'ckpt'}" in errors[0] and "File too large" in errors[0]
        assert "free space" in errors[0]
        checkpoint = tmp_path / "ckpt"
        assert not (checkpoint / "state.json").exists()
        assert [p.name for p in (checkpoint / "rounds").iterdir()] == []  # no half-written adapter left behind

        room = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
        assert room.returncode == 0, room.stderr[-3000:]
    finally:
        for t in threads:
            t.join(60)
    assert "resuming round 1 with its original selection" in room.stderr  # inflight.json survived the failure
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["participants"] for r in report["rounds"]] == [1]
