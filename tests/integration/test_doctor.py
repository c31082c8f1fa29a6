"""`flora doctor` against a real Mosquitto running the project's secured config (TLS, passwords, ACL)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from flora.data.datasets import write_image_folder
from tests.integration.secure_fleet import PROVISIONED_URL, provision_fleet


@pytest.fixture
def fleet_and_broker(tmp_path, tiny_model_dir):
    fleet = provision_fleet(tmp_path, ["jetson-01", "jetson-02"], model=str(tiny_model_dir))
    # jetson-02 was provisioned, but its ACL block never reached the broker (a forgotten copy of `acl`).
    acl = fleet.broker_files / "acl"
    acl.write_text(re.sub(r"\nuser jetson-02\n(topic [^\n]*\n)+", "\n", acl.read_text()))
    broker = fleet.start_broker()
    yield fleet, broker
    broker.stop()


def _config(fleet, broker, node: str, tmp_path, digits, **changes) -> str:
    """The device's provisioned client.toml, pointed at the test broker's port and given real data."""
    data = write_image_folder(digits.subset(range(30)), tmp_path / f"data-{node}")
    text = fleet.device_toml(node).read_text().replace(PROVISIONED_URL, f"mqtts://127.0.0.1:{broker.port}")
    text = re.sub(r"(?m)^data_dir = .*$", f'data_dir = "{data}"', text)
    text = re.sub(r"(?m)^state_dir = .*$", f'state_dir = "{tmp_path / ("state-" + node)}"', text)
    for key, value in changes.items():
        text = re.sub(rf"(?m)^{key} = .*$", f'{key} = "{value}"', text)
    path = tmp_path / f"{node}.toml"
    path.write_text(text)
    return str(path)


def _doctor(config: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "flora.app", "doctor", "--config", config, *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _round_result_on_the_broker(fleet, broker) -> None:
    """What a run leaves: a retained round result, which every device may read."""
    from flora.protocol import Envelope, Topics, envelope_to_bytes
    from flora.transport import Message

    coordinator = fleet.transport(broker, "coordinator")
    coordinator.connect(timeout=10)
    env = Envelope(kind="round_result", run="itest", sender="coordinator", round=1, data={"round": 1})
    coordinator.publish(Message(Topics("itest").metrics, envelope_to_bytes(env), qos=1, retain=True), timeout=10)
    coordinator.close()


def test_a_provisioned_device_passes_every_check(fleet_and_broker, tmp_path, digits):
    fleet, broker = fleet_and_broker
    _round_result_on_the_broker(fleet, broker)
    result = _doctor(_config(fleet, broker, "jetson-01", tmp_path, digits))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("[  ok] broker login: connected as jetson-01 over TLS") for line in lines)
    assert sum(line.startswith("[  ok] ACL publish") for line in lines) == 2
    assert "[  ok] ACL read: flora/v1/itest/metrics (a retained message was delivered)" in lines
    # Nothing retained on the instruction topic before a run: read access there cannot be proven yet.
    assert any(line.startswith("[warn] ACL read: flora/v1/itest/instruction: subscription accepted") for line in lines)
    assert any(line.startswith("[  ok] data: 30 examples, 10 classes") for line in lines)
    assert any(line.startswith("[  ok] model: ") and "loads (clip" in line for line in lines)
    assert lines[-1] == "all checks passed"


def test_each_problem_is_one_line_with_its_fix_and_the_exit_code_says_so(fleet_and_broker, tmp_path, digits):
    fleet, broker = fleet_and_broker
    _round_result_on_the_broker(fleet, broker)
    wrong_password = _doctor(_config(fleet, broker, "jetson-01", tmp_path, digits, password="guessed"), "--skip-model")
    assert wrong_password.returncode == 1
    assert re.search(r"\[FAIL\] broker login: the broker refused jetson-01: .* -> check username and password",
                     wrong_password.stdout)  # fmt: skip

    # Without its ACL block the device still publishes on its own topics, but the round result is not delivered.
    no_acl = _doctor(_config(fleet, broker, "jetson-02", tmp_path, digits), "--skip-model")
    assert "[  ok] ACL publish: flora/v1/itest/status/jetson-02" in no_acl.stdout
    assert "[warn] ACL read: flora/v1/itest/metrics: subscription accepted" in no_acl.stdout

    missing_ca = _doctor(_config(fleet, broker, "jetson-01", tmp_path, digits, ca_file=tmp_path / "none.crt"),
                         "--skip-model")  # fmt: skip
    assert (
        missing_ca.returncode == 1 and "[FAIL] ca_file: " in missing_ca.stdout and "does not exist" in missing_ca.stdout
    )
    assert "Traceback" not in wrong_password.stderr + no_acl.stderr + missing_ca.stderr
