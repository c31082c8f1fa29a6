"""`flora status` against a real Mosquitto: finished runs age out, and the broker password is never printed."""

from __future__ import annotations

import subprocess
import sys
import time

from flora.protocol import Envelope, Topics, envelope_to_bytes
from flora.transport import Message, connect_transport


def _retain(url: str, run: str, sender: str, data: dict, sent_at: float, version: str = "1.3") -> None:
    transport = connect_transport(url, f"seed-{run}-{sender}")
    transport.connect(timeout=10)
    env = Envelope(kind="status", run=run, sender=sender, data=data, sent_at=sent_at, version=version)
    transport.publish(Message(Topics(run).status(sender), envelope_to_bytes(env), qos=1, retain=True), timeout=10)
    transport.close()


def _status(url: str, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "flora.app", "status", "--broker", url, "--wait", "1.5", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": ""})


def test_finished_runs_age_out_and_the_password_is_not_shown(mosquitto):
    two_days_ago = time.time() - 48 * 3600
    _retain(mosquitto.url, "old-run", "coordinator", {"state": "finished", "role": "coordinator"}, two_days_ago)
    _retain(mosquitto.url, "old-run", "jetson-9", {"state": "offline", "last_round_trained": 50}, two_days_ago)
    health = {"temperature_c": 48.5, "power_mode": "MAXN", "agent_version": "0.1.0", "memory_free_mb": 5100.0}
    _retain(
        mosquitto.url,
        "new-run",
        "jetson-1",
        {"state": "online", "last_round_trained": 3, "health": health},
        time.time(),
        version="1.2",  # an older client: the operator sees which devices a 1.3 run's settings leave out
    )
    # Mosquitto here allows anonymous clients, so credentials in the URL are accepted and ignored.
    url = mosquitto.url.replace("mqtt://", "mqtt://observer:s3cret@")

    default = _status(url)
    assert default.returncode == 0, default.stderr[-2000:]
    assert "new-run" in default.stdout and "jetson-1" in default.stdout
    row = next(line for line in default.stdout.splitlines() if "jetson-1" in line)
    assert all(value in row for value in ("MAXN", "48.5", "5,100", "0.1.0", "1.2")), row  # health and protocol
    assert "old-run" not in default.stdout and "1 run(s) finished over 24 h ago not shown" in default.stdout
    assert "s3cret" not in default.stdout + default.stderr and "observer:***@" in default.stdout

    everything = _status(url, "--all")
    assert "old-run" in everything.stdout and "jetson-9" in everything.stdout
