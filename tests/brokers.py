"""Mosquitto brokers for tests and benchmarks: a private Mosquitto 2 on a free loopback port with its own
config file, or the production config of deploy/mosquitto/ moved onto a free port.

Test-only: the runtime core never starts Mosquitto (operators run it as a service).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from flora.transport.base import TransportError
from flora.transport.embedded import BrokerProcess, free_port


def mosquitto_binary() -> str:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise TransportError("mosquitto is not installed; `apt-get install mosquitto` (Debian/Ubuntu/JetPack)")


def mosquitto_broker(
    *,
    port: int | None = None,
    extra_config: str = "",
    log_path: Path | None = None,
    host: str = "127.0.0.1",
    persistence: bool = False,
) -> BrokerProcess:
    """Mosquitto 2 with its own config file on a free loopback port (tests control its limits).

    With `persistence`, retained messages, sessions and queued QoS 1 messages survive a restart.
    """
    port = port or free_port(host)
    workdir = Path(tempfile.mkdtemp(prefix="flora-mosquitto-"))
    config = workdir / "mosquitto.conf"
    store = f"persistence true\npersistence_location {workdir}/\n" if persistence else "persistence false\n"
    base = f"listener {port} {host}\nallow_anonymous true\n{store}"
    config.write_text(base + extra_config)
    return BrokerProcess([mosquitto_binary(), "-c", str(config)], host, port, log_path, workdir)


DEPLOY_FILES_DIR = "/etc/mosquitto/flora/"  # where deploy/mosquitto/mosquitto.conf expects its files
DEPLOY_STORE_DIR = "/var/lib/mosquitto/"


def secured_mosquitto_broker(
    config_file: Path,
    files_dir: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    extra_config: str = "",
) -> BrokerProcess:
    """Mosquitto running a production config (deploy/mosquitto/mosquitto.conf), moved to a free loopback port.

    Only three things change: its one TLS `listener PORT` binds `host` and a free port, the files it reads from
    /etc/mosquitto/flora/ (passwd, acl, certificates) come from `files_dir`, and its persistence goes to a
    temporary directory. Everything else (no anonymous access, the ACL, TLS) is used as written.
    """
    port = port or free_port(host)
    text = Path(config_file).read_text()
    text, listeners = re.subn(r"(?m)^listener\s+\d+\s*$", f"listener {port} {host}", text)
    if listeners != 1 or DEPLOY_FILES_DIR not in text:
        raise TransportError(f"{config_file} must have exactly one `listener PORT` and files in {DEPLOY_FILES_DIR}")
    workdir = Path(tempfile.mkdtemp(prefix="flora-mosquitto-"))
    text = text.replace(DEPLOY_FILES_DIR, f"{Path(files_dir).resolve()}/").replace(DEPLOY_STORE_DIR, f"{workdir}/")
    if os.geteuid() == 0:
        # Started as root, Mosquitto drops to the `mosquitto` user before reading passwd and acl, which a test
        # keeps in a private temporary directory. (Installed, they are root:mosquitto, mode 0640.)
        text += "\nuser root\n"
    config = workdir / "mosquitto.conf"
    config.write_text(text + extra_config)
    return BrokerProcess([mosquitto_binary(), "-c", str(config)], host, port, log_path, workdir, scheme="mqtts")


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's; /usr/sbin's wrapper would su to rabbitmq


class RabbitMqBroker(BrokerProcess):
    """RabbitMQ with its MQTT plugin, private to a test: its own node name, ports (MQTT, AMQP, distribution and
    epmd), config, data and logs in a temporary directory, bound to loopback. Starting takes ~10-20 s.

    RabbitMQ 3.x does not deliver retained messages to wildcard subscriptions and maps '.' in topics to '/'
    (AMQP routing keys): the two ways it differs from Mosquitto that matter to FLoRA (docs/PROTOCOL.md §2).
    """

    def __init__(self, host: str = "127.0.0.1", log_path: Path | None = None):
        port = free_port(host)
        workdir = Path(tempfile.mkdtemp(prefix="flora-rabbitmq-"))
        amqp, dist, epmd = free_port(host), free_port(host), free_port(host)
        (workdir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {host}:{amqp}\n"
            f"mqtt.listeners.tcp.default = {host}:{port}\n"
            "mqtt.allow_anonymous = true\n"
            "log.console = true\nlog.file = false\n"
        )
        env = {
            **os.environ,
            "HOME": str(workdir),  # its Erlang cookie goes here
            "RABBITMQ_NODENAME": f"flora-test-{port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": host,
            "RABBITMQ_DIST_PORT": str(dist),
            "ERL_EPMD_PORT": str(epmd),  # a private epmd, stopped with the broker
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
        }
        self.epmd_port = epmd
        super().__init__([RABBITMQ_SERVER], host, port, log_path, workdir, env=env)

    def start(self, timeout: float = 90.0) -> RabbitMqBroker:
        if not os.access(RABBITMQ_SERVER, os.X_OK):
            raise TransportError("rabbitmq-server is not installed; `apt-get install rabbitmq-server` (Debian)")
        super().start(timeout)
        return self

    def _terminate(self) -> None:
        # The server script starts beam and epmd in its own session: stop that whole group, epmd last.
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        epmd = shutil.which("epmd") or "/usr/bin/epmd"
        if self.proc is not None and os.access(epmd, os.X_OK):
            subprocess.run([epmd, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10)


def bridged_mosquitto_brokers(bridge_topics: str, *, host: str = "127.0.0.1") -> tuple[BrokerProcess, BrokerProcess]:
    """(central, site): two Mosquittos, the site one bridged to the central one with `bridge_topics` (the
    `topic ...` lines of deploy/mosquitto/README.md's example). Start central first, stop site first."""
    central = mosquitto_broker(host=host, persistence=True)
    bridge = (
        f"connection site-to-central\naddress {host}:{central.port}\nclientid flora-site-bridge\n"
        "cleansession false\ntry_private true\nrestart_timeout 1 5\n" + bridge_topics
    )
    site = mosquitto_broker(host=host, persistence=True, extra_config=bridge)
    return central, site
