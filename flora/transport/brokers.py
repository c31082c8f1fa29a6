"""Start a broker on this machine: the embedded amqtt broker (demo) or Mosquitto (tests, production).

Both bind loopback by default. amqtt binds all interfaces and allows anonymous clients unless
told otherwise, so we always pass an explicit 127.0.0.1 listener.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flora.transport.base import TransportError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TransportError(f"broker process exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise TransportError(f"broker did not listen on {host}:{port} within {timeout:.0f}s")


def amqtt_config(host: str, port: int) -> dict:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        # Anonymous is acceptable only because the listener is loopback-only.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


def run_amqtt(host: str = "127.0.0.1", port: int = 1883) -> None:
    """Run the embedded broker in this process until interrupted (`flora broker`)."""
    import asyncio
    import logging

    from amqtt.broker import Broker

    logging.getLogger("amqtt").setLevel(logging.WARNING)

    async def serve() -> None:
        broker = Broker(amqtt_config(host, port))
        await broker.start()
        print(f"embedded MQTT broker listening on mqtt://{host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await broker.shutdown()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


class BrokerProcess:
    """A broker in a child process, stopped on exit. `url` is what clients connect to."""

    def __init__(
        self,
        argv: list[str],
        host: str,
        port: int,
        log_path: Path | None,
        workdir: Path | None = None,
        scheme: str = "mqtt",
    ):
        self.host, self.port, self.argv, self.scheme = host, port, argv, scheme
        self.log_path = log_path
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.host, self.port, timeout, self.proc)
        except TransportError:
            self.stop()
            raise
        return self

    def restart(self, timeout: float = 20.0) -> BrokerProcess:
        """Stop and start again on the same port with the same files (persistence survives)."""
        self._terminate()
        return self.start(timeout)

    def stop(self) -> None:
        self._terminate()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def embedded_broker(host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None) -> BrokerProcess:
    port = port or free_port(host)
    argv = [sys.executable, "-m", "flora.cli", "broker", "--host", host, "--port", str(port)]
    return BrokerProcess(argv, host, port, log_path)


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
