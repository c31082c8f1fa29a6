"""`flora status`: the nodes and the latest round a broker holds, read from retained messages."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from flora.errors import ProtocolError
from flora.live import rounds_table
from flora.protocol import envelope_from_bytes
from flora.protocol.topics import ALL_RUNS_METRICS, ALL_RUNS_STATUS
from flora.transport import connect_transport


def collect(broker_url: str, *, run_id: str | None, wait: float):
    transport = connect_transport(broker_url, f"flora-status-{int(time.time() * 1000) % 10**9}")
    transport.connect(timeout=10)
    transport.subscribe(ALL_RUNS_STATUS)
    transport.subscribe(ALL_RUNS_METRICS)
    nodes, rounds = {}, {}
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
            if env.kind == "status":
                nodes[(env.run, env.sender)] = env.data
            elif env.kind == "round_result":
                rounds[env.run] = env.data
    finally:
        transport.close()
    return nodes, rounds


def print_status(broker_url: str, *, run_id: str | None = None, wait: float = 2.0) -> int:
    console = Console()
    nodes, rounds = collect(broker_url, run_id=run_id, wait=wait)
    table = Table(title=f"nodes on {broker_url}", title_justify="left")
    for column in ("run", "node", "state", "accelerator", "memory free MB", "dataset", "last round"):
        table.add_column(column)
    for (run, node), data in sorted(nodes.items()):
        caps = data.get("capabilities", {})
        free = caps.get("gpu_memory_free_mb", caps.get("memory_free_mb"))
        table.add_row(
            run,
            node,
            str(data.get("state")),
            str(caps.get("accelerator", data.get("role", "-"))),
            "-" if free is None else f"{free:,.0f}",
            str(caps.get("dataset_size", "-")),
            str(data.get("last_round_trained", data.get("round", "-"))),
        )
    console.print(table)
    for run, record in sorted(rounds.items()):
        console.print(rounds_table([record], f"latest round of run '{run}'"))
    if not nodes and not rounds:
        console.print("no FLoRA nodes or rounds seen on this broker")
    return 0
