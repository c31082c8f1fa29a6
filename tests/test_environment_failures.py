"""Environment failures (disk full, an unwritable directory, a missing TLS file) end in one line naming the path
and the fix, exit code 2, with the data on disk intact (issue 11, item 6)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from flora.errors import StorageError
from flora.files import atomic_path, atomic_write_json, check_writable, os_error_of, prune_partial


class _FullDisk:
    """A file object whose writes fail as a full disk's do: the OS edge of atomic_write_bytes."""

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_and_the_fix_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"round": 3})
    before = target.read_bytes()
    monkeypatch.setattr("flora.files.os.fdopen", lambda fd, mode: _FullDisk(fd))
    with pytest.raises(StorageError) as caught:
        atomic_write_json(target, {"round": 4})
    message = str(caught.value)
    assert str(target) in message and "No space left on device" in message and "free space" in message
    assert target.read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temporary left behind


def test_a_library_write_that_only_describes_its_os_error_is_recognised():
    class SafetensorError(Exception):
        pass

    found = os_error_of(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })"))
    assert found is not None and found.errno == errno.ENOSPC


def test_an_atomic_path_into_a_file_names_the_target(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with (
        pytest.raises(StorageError, match=r"cannot write .*not-a-dir/model\.onnx"),
        atomic_path(blocker / "model.onnx") as tmp,
    ):
        tmp.write_bytes(b"x")


def test_check_writable_names_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=r"^checkpoint_dir .*file/ckpt is not writable: cannot write"):
        check_writable(blocker / "ckpt", f"checkpoint_dir {blocker / 'ckpt'}")
    check_writable(tmp_path / "fresh", "output_dir")
    assert list((tmp_path / "fresh").iterdir()) == []  # the probe is removed


def test_prune_partial_removes_what_a_killed_write_left_and_nothing_else(tmp_path):
    rounds = tmp_path / "rounds"
    (rounds / "000003").mkdir(parents=True)
    (rounds / ".000004.k2j_x9ab").mkdir()  # save_adapter_dir's mkdtemp, killed mid-write
    (rounds / ".000004.k2j_x9ab" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".state.json.abcd1234").write_text("{")  # atomic_write_bytes' mkstemp
    (tmp_path / ".strategy_state.safetensors.partial").write_text("x")
    (tmp_path / ".gitignore").write_text("*")  # not ours
    (tmp_path / ".global_adapter.old").mkdir()  # killed mid-swap: the only copy left, kept
    removed = prune_partial(tmp_path) + prune_partial(rounds)
    assert sorted(p.name for p in removed) == [
        ".000004.k2j_x9ab",
        ".state.json.abcd1234",
        ".strategy_state.safetensors.partial",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".gitignore", ".global_adapter.old", "rounds"]
    assert [p.name for p in rounds.iterdir()] == ["000003"]


def _flora(*argv, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "flora.app", *argv], capture_output=True, text=True, timeout=300, **kwargs
    )


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow  # a CLI process that loads the model
def test_an_unwritable_checkpoint_dir_is_found_at_start(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = tmp_path / "coordinator.toml"
    # Nothing listens on port 9: were the directory checked only when round 1 is checkpointed, this would fail
    # on the broker (or wait for clients) instead.
    config.write_text(
        f'model = "{tiny_model_dir}"\ncheckpoint_dir = "{blocker}/ckpt"\nbroker_url = "mqtt://127.0.0.1:9"\n'
    )
    line = _one_error_line(_flora("coordinator", "--config", str(config)))
    assert f"checkpoint_dir {blocker}/ckpt is not writable" in line


def test_a_missing_ca_file_is_named(tmp_path):
    config = tmp_path / "client.toml"
    missing = tmp_path / "certs" / "ca.crt"
    config.write_text(
        f'node_id = "jetson-01"\nmodel = "unused"\ndata_dir = "{tmp_path}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'broker_url = "mqtts://127.0.0.1:9"\nca_file = "{missing}"\n'
    )
    line = _one_error_line(_flora("client", "--config", str(config)))
    assert f"ca_file {missing} does not exist" in line and "make-certs.sh" in line
