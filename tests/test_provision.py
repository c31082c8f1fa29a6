"""`flora provision`: the files it writes, what they contain, and that the roles load them as they are.

(A real Mosquitto accepting the accounts and enforcing the ACL: tests/integration/test_broker_security.py.)
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from coordinator.config import load_coordinator_config
from edge_client.config import load_client_config
from flora.app.cli import main
from flora.app.provision import acl_template, add_device_to_acl, password_hash, set_password
from flora.protocol.signing import load_private_key, load_public_key, public_key_pem

ROOT = Path(__file__).resolve().parents[1]


def provision(tmp_path, *args) -> int:
    return main(["provision", *args, "--out", str(tmp_path / "prov"), "--broker-url", "mqtts://broker.example:8883"])


def test_provision_writes_a_device_and_the_coordinator(tmp_path, capsys):
    assert provision(tmp_path, "jetson-01", "jetson-02", "--run-id", "farm") == 0
    out = tmp_path / "prov"
    device, coordinator = out / "devices" / "jetson-01", out / "coordinator"
    assert "copy" in capsys.readouterr().out

    client = load_client_config(device / "client.toml")  # the device's own loader, file as written
    assert (client.node_id, client.username, client.run_id) == ("jetson-01", "jetson-01", "farm")
    assert client.broker_url == "mqtts://broker.example:8883" and len(client.password) >= 24
    # Paths name where the files will be on the device (install dir /etc/flora by default).
    assert client.signing_key == Path("/etc/flora/signing.key")
    assert client.coordinator_public_key == Path("/etc/flora/coordinator.pub")
    server = load_coordinator_config(coordinator / "coordinator.toml")
    assert server.require_signatures and server.device_keys_dir == Path("/etc/flora/device-keys")
    assert server.username == server.node_id == "coordinator" and server.password != client.password

    # The device's private key matches the public key the coordinator will verify it with.
    device_key = load_private_key(device / "signing.key")
    assert public_key_pem(device_key.public_key()) == public_key_pem(
        load_public_key(coordinator / "device-keys" / "jetson-01.pub")
    )
    assert (device / "coordinator.pub").read_bytes() == (coordinator / "coordinator.pub").read_bytes()
    for secret in (device / "signing.key", device / "client.toml", coordinator / "coordinator.key"):
        assert secret.stat().st_mode & 0o077 == 0, secret

    passwd = (out / "mosquitto" / "passwd").read_text().splitlines()
    assert sorted(line.split(":")[0] for line in passwd) == ["coordinator", "jetson-01", "jetson-02"]
    assert all(line.split(":", 1)[1].startswith("$7$101$") for line in passwd)
    acl = (out / "mosquitto" / "acl").read_text()
    assert acl.startswith(acl_template()) and acl.count("user jetson-01\n") == 1
    assert "topic read flora/v1/+/instruction/chunk/+" in acl


def test_reprovisioning_needs_force_and_rotates_the_key(tmp_path, capsys):
    assert provision(tmp_path, "jetson-01") == 0
    pub = tmp_path / "prov" / "coordinator" / "device-keys" / "jetson-01.pub"
    coordinator_key = (tmp_path / "prov" / "coordinator" / "coordinator.key").read_bytes()
    first = pub.read_bytes()
    assert provision(tmp_path, "jetson-01") == 2
    assert "--force" in capsys.readouterr().err
    assert provision(tmp_path, "jetson-01", "--force") == 0
    assert pub.read_bytes() != first
    assert (tmp_path / "prov" / "coordinator" / "coordinator.key").read_bytes() == coordinator_key  # kept
    assert (tmp_path / "prov" / "mosquitto" / "acl").read_text().count("user jetson-01\n") == 1


@pytest.mark.parametrize("node", ["../etc", "a b", "coordinator"])
def test_bad_node_ids_are_refused(tmp_path, capsys, node):
    assert provision(tmp_path, node) == 2
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "prov").exists()  # checked before anything is written


def test_in_place_configs_name_the_written_files(tmp_path):
    assert provision(tmp_path, "jetson-01", "--in-place") == 0
    client = load_client_config(tmp_path / "prov" / "devices" / "jetson-01" / "client.toml")
    load_private_key(client.signing_key)
    load_public_key(client.coordinator_public_key)


def test_the_shipped_acl_is_the_template():
    assert (ROOT / "deploy" / "mosquitto" / "acl").read_text() == acl_template()


def test_password_hash_matches_mosquitto_passwd():
    # Written by mosquitto_passwd 2.0.11 for the password "pa".
    line = (
        "$7$101$mPSDMo+Zfoc56MwG$"
        "Q/aEM594feL2wHzfESXP47SlXe0e6vVPScRvQJUPWN/qpgrRFZQIm6dFcfWq4UOlvpzg4t4ReTHc7mdUJzVpEw=="
    )
    salt = base64.b64decode(line.split("$")[3])
    assert password_hash("pa", salt=salt) == line


def test_built_in_password_file_and_acl_updates(tmp_path):
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    assert set_password(passwd, "a", "one", use_mosquitto_passwd=False) == "built-in"
    set_password(passwd, "b", "two", use_mosquitto_passwd=False)
    first_b = passwd.read_text().splitlines()[1]
    set_password(passwd, "a", "three", use_mosquitto_passwd=False)  # replaces a's line, keeps b's
    lines = passwd.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["b", "a"] and first_b in lines
    assert add_device_to_acl(acl, "a") and not add_device_to_acl(acl, "a")
    assert acl.read_text().count("user a\n") == 1


def test_a_device_added_later_joins_the_fleet_with_its_saved_settings(tmp_path, capsys):
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nfleet CA\n-----END CERTIFICATE-----\n")
    first = ["--run-id", "farm", "--model", "/models/clip-b32", "--certs", str(certs)]
    assert provision(tmp_path, "jetson-01", *first) == 0
    out = tmp_path / "prov"
    # Weeks later: only the new device's id (and the directory) is given.
    assert main(["provision", "jetson-09", "--out", str(out)]) == 0
    early = load_client_config(out / "devices" / "jetson-01" / "client.toml")
    late = load_client_config(out / "devices" / "jetson-09" / "client.toml")
    for setting in ("run_id", "broker_url", "model", "ca_file", "data_dir", "state_dir"):
        assert getattr(late, setting) == getattr(early, setting), setting
    assert (late.run_id, late.model, late.broker_url) == ("farm", "/models/clip-b32", "mqtts://broker.example:8883")
    assert late.ca_file == "/etc/flora/tls/ca.crt" and (out / "devices" / "jetson-09" / "tls" / "ca.crt").is_file()
    # The documented absolute paths (docs/EDGE.md, the systemd units), not the working directory's.
    assert late.state_dir == Path("/var/lib/flora") and late.data_dir == Path("/var/lib/flora/data")
    server = load_coordinator_config(out / "coordinator" / "coordinator.toml")
    assert server.checkpoint_dir == Path("/var/lib/flora/coordinator") and server.model == "/models/clip-b32"


def test_a_flag_that_contradicts_the_fleet_is_refused_unless_the_change_is_meant(tmp_path, capsys):
    assert provision(tmp_path, "jetson-01", "--run-id", "farm") == 0
    out = str(tmp_path / "prov")
    assert main(["provision", "jetson-02", "--out", out, "--run-id", "orchard"]) == 2
    error = capsys.readouterr().err
    assert "run_id: fleet has 'farm', flag says 'orchard'" in error and "--update-fleet" in error
    assert not (tmp_path / "prov" / "devices" / "jetson-02").exists()  # nothing written
    assert main(["provision", "jetson-02", "--out", out, "--run-id", "orchard", "--update-fleet"]) == 0
    assert load_client_config(tmp_path / "prov" / "devices" / "jetson-02" / "client.toml").run_id == "orchard"
    assert 'run_id = "orchard"' in (tmp_path / "prov" / "fleet.toml").read_text()
