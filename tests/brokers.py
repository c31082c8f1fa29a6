"""Mosquitto brokers for tests and benchmarks: a private Mosquitto 2 on a free loopback port with its own
config file, or the production config of deploy/mosquitto/ moved onto a free port.

Test-only: the runtime core never starts Mosquitto (operators run it as a service).
"""

from __future__ import annotations

import os
import re
import shutil
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
