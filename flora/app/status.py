"""`flora status`: the nodes and the latest round a broker holds, read from retained messages.

With `--run-id`, it also publishes a presence request for that run (docs/PROTOCOL.md §5.7), so every client
online in it answers with a fresh status: the only way to see them on a broker that does not deliver retained
messages to wildcard subscriptions (RabbitMQ 3.x), and a check that "online" is not a stale retained copy.
Clients answer at most once per 5 s, so the wait is stretched to cover that.

Runs whose coordinator said "finished" longer ago than `max_age_h` are left out (their retained
messages stay on the broker forever); `show_all` keeps them. The broker URL is shown without its password.
"""

from __future__ import annotations

import contextlib
import math
import time

from rich.console import Console
from rich.table import Table

from flora.errors import ProtocolError
from flora.live import rounds_table
from flora.protocol import Envelope, Topics, envelope_from_bytes, envelope_to_bytes
from flora.protocol.topics import ALL_RUNS_METRICS, ALL_RUNS_STATUS
from flora.transport import connect_transport
from flora.transport.base import Message, TransportError, redact_url

PRESENCE_WAIT_S = 6.0  # clients answer a presence request at most once per 5 s (edge_client/presence.py)


def collect(broker_url: str, *, run_id: str | None, wait: float, ca_file: str | None = None):
    """(nodes, rounds, finished_at): statuses by (run, node), the latest round record by run, and when each
    finished run's coordinator said so (its status envelope's sent_at)."""
    client_id = f"flora-status-{int(time.time() * 1000) % 10**9}"
    transport = connect_transport(broker_url, client_id, ca_file=ca_file)
    transport.connect(timeout=10)
    transport.subscribe(ALL_RUNS_STATUS)
    transport.subscribe(ALL_RUNS_METRICS)
    if run_id:
        wait = max(wait, PRESENCE_WAIT_S)
        ask_for_presence(transport, run_id, client_id)
    nodes, rounds, finished_at = {}, {}, {}
    end = time.monotonic() + wait
    try:
        while time.monotonic() < end:
            message = transport.receive(timeout=0.1)
            if message is None:
                continue
            try:
                env = envelope_from_bytes(message.payload)
            except ProtocolError:
                continue
            if run_id and env.run != run_id:
                continue
            if env.kind == "status" and isinstance(env.data, dict):
                # The version the status is written in: which settings the device can follow (a run with
                # fractional epochs or SGD clients needs 1.3, docs/PROTOCOL.md §9).
                nodes[(env.run, env.sender)] = {**env.data, "protocol": env.version}
                if env.data.get("role") == "coordinator" and env.data.get("state") == "finished":
                    finished_at[env.run] = env.sent_at
            elif env.kind == "round_result":
                rounds[env.run] = env.data
    finally:
        transport.close()
    return nodes, rounds, finished_at


def ask_for_presence(transport, run_id: str, sender: str) -> None:
    """Ask the run's clients to publish their status now. Best effort: a secured broker's ACL may not let an
    observer publish there (Mosquitto then drops it silently), and the retained statuses are still read."""
    env = Envelope(kind="presence", run=run_id, sender=sender, data={})
    with contextlib.suppress(TransportError):
        transport.publish(Message(Topics(run_id).presence, envelope_to_bytes(env), qos=1), timeout=5)


def stale_runs(finished_at: dict[str, float], *, max_age_h: float, now: float | None = None) -> set[str]:
    """Runs that finished more than `max_age_h` hours ago."""
    now = time.time() if now is None else now
    return {run for run, at in finished_at.items() if isinstance(at, (int, float)) and now - at > max_age_h * 3600}


def print_status(
    broker_url: str,
    *,
    run_id: str | None = None,
    wait: float = 2.0,
    ca_file: str | None = None,
    max_age_h: float = 24.0,
    show_all: bool = False,
) -> int:
    console = Console()
    nodes, rounds, finished_at = collect(broker_url, run_id=run_id, wait=wait, ca_file=ca_file)
    hidden = set() if show_all or run_id else stale_runs(finished_at, max_age_h=max_age_h)
    nodes = {key: data for key, data in nodes.items() if key[0] not in hidden}
    rounds = {run: record for run, record in rounds.items() if run not in hidden}
    table = Table(title=f"nodes on {redact_url(broker_url)}", title_justify="left")
    columns = ("run", "node", "state", "last round", "recipe", "agent", "protocol", "accelerator", "dataset")
    for column in (*columns, "memory free MB", "disk free MB", "temp °C", "power mode", "GPU %"):
        table.add_column(column)
    for (run, node), data in sorted(nodes.items()):
        caps = _mapping(data.get("capabilities"))
        health = _mapping(data.get("health"))
        table.add_row(
            run,
            node,
            _text(data.get("state")),
            _number(data.get("last_round_trained", data.get("round")), "{:.0f}"),
            _text(data.get("recipe", data.get("role"))),
            _text(health.get("agent_version")),
            _text(data.get("protocol")),
            _text(caps.get("accelerator")),
            _number(caps.get("dataset_size"), "{:,.0f}"),
            _number(_free_memory(health, caps), "{:,.0f}"),
            _number(health.get("disk_free_mb"), "{:,.0f}"),
            _number(health.get("temperature_c"), "{:.1f}"),
            _text(health.get("power_mode")),
            _number(health.get("gpu_load_pct"), "{:.0f}"),
        )
    console.print(table)
    for run, record in sorted(rounds.items()):
        console.print(rounds_table([record], f"latest round of run '{run}'"))
    if hidden:
        console.print(f"{len(hidden)} run(s) finished over {max_age_h:g} h ago not shown (--all shows them)")
    if not nodes and not rounds:
        console.print("no FLoRA nodes or rounds seen on this broker")
        if not run_id:
            console.print(
                "a broker that does not deliver retained messages to wildcard subscriptions (RabbitMQ) shows nothing "
                "here: pass --run-id RUN to ask that run's clients for their status"
            )
    return 0


# What a status carries came over the network: show it only as checked text and finite numbers.
def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value) -> str:
    return value[:40] if isinstance(value, str) and value else "-"


def _number(value, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return fmt.format(value)


def _free_memory(health: dict, caps: dict):
    """The freshest reading: the periodic health, else what the device announced when it connected."""
    for value in (health.get("memory_free_mb"), caps.get("gpu_memory_free_mb"), caps.get("memory_free_mb")):
        if value is not None:
            return value
    return None
