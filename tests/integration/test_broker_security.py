"""A real Mosquitto started with deploy/mosquitto/ (TLS, password file, ACL), provisioned by `flora provision`.

Mosquitto answers a forbidden publish from an MQTT 3.1.1 client with an ordinary PUBACK and drops it, and
acknowledges a forbidden subscription but delivers nothing on it. So each denial is shown by a party that
*is* allowed to see the message never receiving it, while an allowed marker sent after it does arrive.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from flora.transport import Message, TransportError
from flora.transport.base import RECONNECTED
from tests.integration.secure_fleet import MAKE_CERTS, make_certs, provision_fleet

pytestmark = pytest.mark.integration

RUN = "itest"


def topic(kind: str, node: str | None = None) -> str:
    return f"flora/v1/{RUN}/{kind}" + (f"/{node}" if node else "")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return provision_fleet(tmp_path_factory.mktemp("secure"), ["device-a", "device-b"])


@pytest.fixture(scope="module")
def broker(fleet):
    broker = fleet.start_broker()
    yield broker
    broker.stop()


@pytest.fixture
def connect(fleet, broker):
    opened = []

    def _connect(user, **kwargs):
        transport = fleet.transport(broker, user, **kwargs)
        transport.connect(timeout=5)
        opened.append(transport)
        return transport

    yield _connect
    for transport in opened:
        transport.close()


def drain(transport, seconds: float) -> list[str]:
    got, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        message = transport.receive(timeout=0.05)
        if message is not None:
            got.append(message.topic)
    return got


def wait_until_received(sender, receiver, message: Message, timeout: float = 10.0) -> None:
    """Publish `message` until `receiver` gets it: its subscriptions are then live on the broker."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sender.publish(message)
        got = receiver.receive(timeout=0.3)
        if got is not None and got.topic == message.topic:
            while receiver.receive(timeout=0.1) is not None:  # earlier copies of the marker
                pass
            return
    raise AssertionError(f"{message.topic} never arrived")


def test_anonymous_and_wrong_passwords_are_refused(fleet, broker):
    for transport in (
        fleet.transport(broker, None),
        fleet.transport(broker, "device-a", password="not-the-password"),
        fleet.transport(broker, "nobody"),
    ):
        with pytest.raises(TransportError, match="refused"):
            transport.connect(timeout=5)


def test_both_password_hashes_work_over_verified_tls(fleet, broker, connect):
    # device-a's hash was written by mosquitto_passwd, device-b's by flora's own "$7$" writer.
    assert connect("device-a").connected and connect("device-b").connected
    # The server certificate names localhost too; a client certificate may be presented as well.
    device = connect(
        "device-a",
        host="localhost",
        cert_file=str(fleet.certs / "device-a.crt"),
        key_file=str(fleet.certs / "device-a.key"),
    )
    assert device.connected


def test_mutual_tls_can_replace_the_password(fleet):
    # The option deploy/mosquitto/mosquitto.conf describes: a client certificate, its CN as the username.
    broker = fleet.start_broker(extra_config="require_certificate true\nuse_identity_as_username true\n")
    try:
        certified = fleet.transport(
            broker,
            "device-a",
            password=None,
            cert_file=str(fleet.certs / "device-a.crt"),
            key_file=str(fleet.certs / "device-a.key"),
        )
        certified.connect(timeout=5)
        assert certified.connected
        certified.close()
        with pytest.raises(TransportError):  # a password alone is no longer enough
            fleet.transport(broker, "device-b").connect(timeout=2)
    finally:
        broker.stop()


def test_a_client_trusting_another_ca_is_refused(fleet, broker, tmp_path):
    other_ca = make_certs(tmp_path / "other", "localhost", "127.0.0.1") / "ca.crt"
    impostor_check = fleet.transport(broker, "device-a", ca_file=str(other_ca))
    started = time.monotonic()
    with pytest.raises(TransportError, match="TLS verification"):
        impostor_check.connect(timeout=20)
    assert time.monotonic() - started < 10  # refused at once: retrying cannot fix a certificate


def test_a_device_cannot_publish_on_another_devices_topics(connect):
    device_a = connect("device-a")
    watcher = connect("coordinator")  # reads everything under flora/v1
    watcher.subscribe("flora/v1/#")
    wait_until_received(device_a, watcher, Message(topic("update", "device-a"), b"ready"))

    for forbidden in (
        topic("update", "device-b"),
        topic("update", "device-b") + "/chunk/0",
        topic("status", "device-b"),
        topic("instruction"),
        topic("metrics"),
    ):
        device_a.publish(Message(forbidden, b"forged", retain=forbidden.endswith(("status/device-b", "instruction"))))
    device_a.publish(Message(topic("update", "device-a") + "/chunk/0", b"own chunk"))
    device_a.publish(Message(topic("status", "device-a"), b"own status"))
    # Mosquitto handles one client's messages in order: once the last allowed one is in, the rest were dropped.
    assert drain(watcher, 1.5) == [topic("update", "device-a") + "/chunk/0", topic("status", "device-a")]


def test_a_device_cannot_read_another_devices_updates(connect):
    device_a, device_b, coordinator = connect("device-a"), connect("device-b"), connect("coordinator")
    for topic_filter in (topic("update", "device-b"), topic("update", "+"), topic("status", "+"), "flora/v1/#"):
        device_a.subscribe(topic_filter)
    device_a.subscribe(topic("instruction"))
    wait_until_received(coordinator, device_a, Message(topic("instruction"), b"ready"))

    device_b.publish(Message(topic("update", "device-b"), b"device-b's adapter"))
    device_b.publish(Message(topic("update", "device-b") + "/chunk/0", b"a chunk of it"))
    device_b.publish(Message(topic("status", "device-b"), b"device-b's status"))
    coordinator.publish(Message(topic("metrics"), b"round result"))  # addressed to every device
    assert drain(device_a, 1.5) == [topic("metrics")]


def test_a_device_cannot_take_over_another_devices_session(connect):
    device_b = connect("device-b")
    device_a = connect("device-a", client_id="device-b")  # use_username_as_clientid: it is still "device-a"
    # Once device-a's publish is acknowledged the broker has handled its CONNECT, and a takeover would
    # already have closed device-b's connection; device-b's own acknowledged publish then shows whether it had to
    # reconnect (RECONNECTED in its inbox) or kept its session.
    device_a.publish(Message(topic("status", "device-a"), b"here"), timeout=5)
    device_b.publish(Message(topic("status", "device-b"), b"still here"), timeout=5)
    assert device_b.connected
    inbox = []
    while (message := device_b.receive(timeout=0)) is not None:  # what is already there, without waiting
        inbox.append(message.topic)
    assert RECONNECTED not in inbox


def test_make_certs_keeps_its_ca_and_adds_clients(fleet, tmp_path):
    certs = make_certs(tmp_path / "certs", "broker.example", "10.0.0.5", clients=("device-c",))
    ca = (certs / "ca.crt").read_bytes()
    make_certs(certs, "broker.example", clients=("device-d",))
    assert (certs / "ca.crt").read_bytes() == ca
    assert oct((certs / "ca.key").stat().st_mode & 0o777) == "0o600"
    for name in ("server", "device-c", "device-d"):
        subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / f"{name}.crt")], check=True)
    text = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert "DNS:broker.example" in text and "IP Address:10.0.0.5" in text
    refused = subprocess.run(["bash", str(MAKE_CERTS), str(certs), "h", "--client", "../escape"], capture_output=True)
    assert refused.returncode == 2 and b"bad node id" in refused.stderr
