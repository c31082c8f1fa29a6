"""The embedded MQTT broker (amqtt) for `flora demo` and `flora broker`, and the child-process handle.

It binds loopback by default. amqtt binds all interfaces and allows anonymous clients unless
told otherwise, so we always pass an explicit 127.0.0.1 listener. (Tests start their own
Mosquitto through tests/brokers.py, which builds on `BrokerProcess` here.)
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
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
        env: dict[str, str] | None = None,
    ):
        self.host, self.port, self.argv, self.scheme = host, port, argv, scheme
        self.log_path = log_path
        self.workdir = workdir
        self.env = env  # the child's environment (None: ours)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env, cwd=self.workdir
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()  # the child has its own copy
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
    argv = [sys.executable, "-m", "flora.app", "broker", "--host", host, "--port", str(port)]
    return BrokerProcess(argv, host, port, log_path)
