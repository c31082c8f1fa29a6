"""The dashboard's state: a round's progress from real envelopes, and hostile messages that must not crash it
or grow it past its bounds."""

from __future__ import annotations

import json
import struct

import numpy as np

from flora.app.dashboard.state import DashboardState, Limits
from flora.protocol import Envelope, Topics, adapter_to_body, envelope_to_bytes
from flora.protocol.chunking import split_message
from flora.records import RoundRecord

RUN = "r1"
T = Topics(RUN)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def env(kind: str, sender: str, data: dict | None = None, round_: int | None = None, **kwargs) -> bytes:
    return envelope_to_bytes(Envelope(kind=kind, run=RUN, sender=sender, round=round_, data=data or {}, **kwargs))


def raw_header(header) -> bytes:
    """An envelope with any header at all, bypassing the encoder's checks (NaN included)."""
    text = json.dumps(header).encode()
    return b"FLRA" + struct.pack(">I", len(text)) + text


def status(node: str, **data) -> tuple[str, bytes]:
    return T.status(node), env("status", node, data)


def train(round_: int, selected: list[str], deadline: float, size: int = 4) -> bytes:
    body, meta = adapter_to_body({"base_model.model.x.lora_A.weight": np.ones((size, size), dtype=np.float32)})
    data = {"selected": selected, "deadline": deadline, "recipe": "both-towers"}
    return env("train", "coordinator", data, round_, body=body, body_meta=meta)


def update(node: str, round_: int) -> bytes:
    body, meta = adapter_to_body({"base_model.model.x.lora_A.weight": np.zeros((4, 4), dtype=np.float32)})
    return env("update", node, {"num_examples": 10}, round_, body=body, body_meta=meta)


def result(round_: int, **fields) -> bytes:
    record = RoundRecord(round=round_, rounds_total=3, **fields)
    return env("round_result", "coordinator", record.to_dict(), round_)


def test_a_round_from_instruction_to_record():
    clock = Clock()
    state = DashboardState(clock=clock)
    assert state.handle(*status("jetson-1", state="online", last_round_trained=-1, recipe="paper"))
    assert state.handle(*status("coordinator", state="online", role="coordinator", round=0))
    assert state.handle(T.instruction, train(1, ["jetson-1", "jetson-2", "jetson-3"], deadline=1060.0))
    assert state.handle(T.update("jetson-1"), update("jetson-1", 1))
    assert state.handle(T.update("jetson-2"), update("jetson-2", 1))
    assert not state.handle(T.update("jetson-3"), update("jetson-3", 7))  # another round: not an answer to this one

    run = state.snapshot()["runs"][0]
    assert run["run"] == RUN and [n["node"] for n in run["nodes"]] == ["jetson-1"]  # the coordinator is apart
    assert run["coordinator"]["state"] == "online" and run["nodes"][0]["recipe"] == "paper"
    current = run["current"]
    assert (current["round"], current["selected"], current["answered"], current["late"]) == (1, 3, 2, 0)
    assert [p["state"] for p in current["nodes"]] == ["answered", "answered", "waiting"]

    clock.now = 1061.0  # past the deadline, still no answer from jetson-3
    current = state.snapshot()["runs"][0]["current"]
    assert current["late"] == 1 and current["nodes"][2] == {"node": "jetson-3", "state": "late"}

    record = result(1, selected=3, participants=1, accepted=("jetson-1",), rejected={"shape_mismatch": 1}, accuracy=0.5)
    assert state.handle(T.metrics, record)
    run = state.snapshot()["runs"][0]
    assert [p["state"] for p in run["current"]["nodes"]] == ["accepted", "rejected", "missing"]
    assert run["current"]["rejected"] == {"shape_mismatch": 1} and run["rounds"][0]["accuracy"] == 0.5

    assert state.handle(T.instruction, env("finished", "coordinator", {"rounds": 1}, 1))
    assert state.snapshot()["runs"][0]["finished"] is True


def test_a_chunked_instruction_is_read_from_its_first_chunk():
    state = DashboardState(clock=Clock())
    pieces = split_message(T.instruction, train(2, ["a", "b"], deadline=2000.0, size=64), max_message_bytes=4096)
    assert len(pieces) > 1 and pieces[0][0] == T.instruction + "/chunk/0"
    for topic, payload in pieces:
        state.handle(topic, payload)
    current = state.snapshot()["runs"][0]["current"]
    assert current["round"] == 2 and current["selected"] == 2 and current["deadline"] == 2000.0


def test_an_update_body_is_never_decoded():
    state = DashboardState(clock=Clock())
    state.handle(T.instruction, train(1, ["a"], deadline=2000.0))
    corrupt = bytearray(update("a", 1))
    corrupt[-1] ^= 0xFF  # the body no longer matches its sha256: a full decode would refuse it
    assert state.handle(T.update("a"), bytes(corrupt))
    assert state.snapshot()["runs"][0]["current"]["answered"] == 1


def test_hostile_messages_neither_crash_nor_grow_the_state():
    limits = Limits(runs=4, nodes_per_run=50, rounds_per_run=20, reasons=5, text=16)
    state = DashboardState(limits=limits, clock=Clock())
    hostile = [
        (T.status("x"), b"\x00garbage"),
        (T.status("x"), b"FLRA\xff\xff\xff\xff"),
        (T.status("x"), raw_header([1, 2, 3])),
        (T.status("x"), raw_header({"v": "1.1", "kind": "status", "run": RUN, "sender": "x", "data": "online"})),
        (T.status("x"), env("status", "y", {"state": "online"})),  # sender is not the topic's node
        (
            T.metrics,
            raw_header({"v": "1.1", "kind": "round_result", "run": RUN, "sender": "c", "data": {"round": "1"}}),
        ),
        (T.metrics, raw_header({"v": "9.0", "kind": "round_result", "run": RUN, "sender": "c", "data": {"round": 1}})),
        (T.instruction, raw_header({"v": "1.1", "kind": "train", "run": RUN, "sender": "c", "round": -1})),
        (T.instruction, raw_header({"v": "1.1", "kind": "train", "run": "other", "sender": "c", "round": 1})),
        (T.update("a"), b""),
        ("flora/v1/bad run/status/x", env("status", "x", {"state": "online"})),
        ("flora/v1", b""),
        ("elsewhere/entirely", b"\x00"),
        (T.metrics + "/chunk/0", b"\x00"),
    ]
    for topic, payload in hostile:
        assert state.handle(topic, payload) is False, topic
    # Floods: 10,000 fake nodes, rounds and runs.
    for i in range(10_000):
        state.handle(*status(f"fake-{i}", state="online"))
        state.handle(T.metrics, result(i + 1, accuracy=0.1))
    for i in range(100):
        state.handle(f"flora/v1/run-{i}/status/n", envelope_to_bytes(Envelope("status", f"run-{i}", "n", data={})))

    snapshot = state.snapshot()
    json.dumps(snapshot, allow_nan=False)  # strict JSON: what /api/state sends
    assert len(snapshot["runs"]) == limits.runs
    assert all(
        len(r["nodes"]) <= limits.nodes_per_run and len(r["rounds"]) <= limits.rounds_per_run for r in snapshot["runs"]
    )
    assert snapshot["messages"] == len(hostile) + 20_000 + 100
    # The most recently active runs and nodes are the ones kept.
    assert [r["run"] for r in snapshot["runs"]] == ["run-99", "run-98", "run-97", "run-96"]


def test_odd_values_are_dropped_not_kept():
    state = DashboardState(limits=Limits(reasons=5, text=16), clock=Clock())
    weird = {
        "state": "o" * 100,
        "last_round_trained": float("nan"),
        "recipe": ["x"],
        "health": {"temperature_c": 1e309},
    }
    state.handle(T.status("x"), raw_header({"v": "1.1", "kind": "status", "run": RUN, "sender": "x", "data": weird}))
    record = {"round": 2, "accuracy": float("nan"), "bytes_up": -5, "accepted": "x", "selected": True}
    record["rejected"] = {f"reason-{i}": i for i in range(100)}
    state.handle(T.metrics, raw_header({"v": "1.1", "kind": "round_result", "run": RUN, "sender": "c", "data": record}))
    run = state.snapshot()["runs"][0]
    node, kept = run["nodes"][0], run["rounds"][0]
    assert node["state"] == "o" * 16 and node["last_round_trained"] is None and node["recipe"] is None
    assert node["temperature_c"] is None
    assert kept["accuracy"] is None and kept["bytes_up"] is None and kept["accepted"] == [] and kept["selected"] is None
    assert len(kept["rejected"]) == 5


def test_health_fields_are_read_wherever_an_agent_puts_them():
    state = DashboardState(clock=Clock())
    state.handle(
        *status("a", state="online", health={"temperature_c": 51.5, "power_mode": "MAXN"}, agent_version="0.2")
    )
    state.handle(*status("b", state="online", capabilities={"gpu_memory_free_mb": 2048.0}))
    a, b = state.snapshot()["runs"][0]["nodes"]
    assert (a["temperature_c"], a["power_mode"], a["agent_version"], a["disk_free_mb"]) == (51.5, "MAXN", "0.2", None)
    assert b["memory_free_mb"] == 2048.0 and b["temperature_c"] is None


def test_the_last_announced_details_outlive_the_offline_status():
    state = DashboardState(clock=Clock())
    state.handle(*status("a", state="online", recipe="paper", capabilities={"memory_free_mb": 900.0}))
    state.handle(*status("a", state="offline", last_round_trained=3))  # the Last Will: state and round only
    node = state.snapshot()["runs"][0]["nodes"][0]
    assert (node["state"], node["last_round_trained"], node["recipe"], node["memory_free_mb"]) == (
        "offline",
        3,
        "paper",
        900.0,
    )
