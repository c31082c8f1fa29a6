"""What the dashboard knows about each run, built from broker messages that are all untrusted.

`DashboardState.handle(topic, payload)` takes any message on the topics the observer subscribes to and
never raises: anything that does not parse, has the wrong type or is out of range is counted and dropped.
Every collection is bounded (`Limits`): runs, nodes per run, rounds per run, the selection and the answers
of the open round, rejection reasons, text lengths. When full, the least recently active run or node
makes room, so a flood of fake ids can push real ones out of view but can never grow memory.

Only envelope headers are read (flora.protocol.envelope.read_header): an update's adapter body is never
decoded or hashed, and chunks are not reassembled. A train instruction too large for one packet is read
from its first chunk, whose body starts with the whole instruction's header (docs/PROTOCOL.md §2.1).

The broker retains only each run's latest round record, so the round history starts when the dashboard
started; `snapshot()` says when that was.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from flora.errors import ProtocolError
from flora.protocol.envelope import check_id, read_header
from flora.protocol.topics import ROOT

_ROOT_LEVELS = ROOT.split("/")

# Health fields a node's status may carry, and the keys each is read from, first found wins. They are
# looked up in the status's `health` object, then `capabilities`, then the status itself, so agents that
# report them under either name show up without a dashboard change.
HEALTH_KEYS: dict[str, tuple[str, ...]] = {
    "memory_free_mb": ("memory_free_mb", "gpu_memory_free_mb"),
    "disk_free_mb": ("disk_free_mb",),
    "temperature_c": ("temperature_c", "soc_temperature_c", "temp_c"),
    "power_mode": ("power_mode", "nvpmodel"),
    "gpu_load_pct": ("gpu_load_pct", "gpu_load"),
    "agent_version": ("agent_version", "flora_version", "version"),
}


@dataclasses.dataclass(frozen=True)
class Limits:
    runs: int = 16
    nodes_per_run: int = 512
    rounds_per_run: int = 1000
    reasons: int = 32
    text: int = 64  # characters kept of any free-text value (state, recipe, health strings, reasons)


# -- validation of untrusted values: each returns None when the value is not what it should be -----------
def _id(value: Any) -> str | None:
    try:
        return check_id(value, "id")
    except ProtocolError:
        return None


def _int(value: Any, low: int = 0) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**53:
        return None
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value) if abs(value) < 1e300 else math.inf
    return value if math.isfinite(value) else None


def _text(value: Any, limits: Limits) -> str | None:
    return value[: limits.text] if isinstance(value, str) else None


def _scalar(value: Any, limits: Limits) -> float | str | None:
    return _number(value) if not isinstance(value, str) else _text(value, limits)


@dataclasses.dataclass
class OpenRound:
    """The latest train instruction of a run: who was asked, by when, and who has answered so far."""

    round: int
    msg_id: str
    selected: list[str] | None  # None: unknown (a chunked instruction whose first chunk we did not see)
    deadline: float | None
    answered: dict[str, float] = dataclasses.field(default_factory=dict)  # node -> when we saw its update


@dataclasses.dataclass
class RunView:
    last_activity: float
    nodes: OrderedDict[str, dict[str, Any]] = dataclasses.field(default_factory=OrderedDict)  # LRU order
    rounds: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    coordinator: dict[str, Any] | None = None
    open_round: OpenRound | None = None
    finished: bool = False


class DashboardState:
    def __init__(
        self, *, limits: Limits | None = None, run_id: str | None = None, clock: Callable[[], float] = time.time
    ):
        self.limits = limits or Limits()
        self.run_id = run_id  # only this run, when set
        self.clock = clock
        self.started_at = clock()
        self.messages = 0
        self.ignored = 0  # messages that were malformed, out of range or for another run
        self._runs: OrderedDict[str, RunView] = OrderedDict()  # least recently active first
        self._lock = threading.Lock()

    # -- input ---------------------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> bool:
        """Apply one broker message; True if it changed what the dashboard shows. Never raises."""
        with self._lock:
            self.messages += 1
            try:
                used = self._handle(topic, payload)
            except Exception:  # a case the checks below missed must still not stop the observer
                used = False
            if not used:
                self.ignored += 1
            return used

    def _handle(self, topic: str, payload: bytes) -> bool:
        levels = topic.split("/") if isinstance(topic, str) else []
        if len(levels) < 4 or levels[:2] != _ROOT_LEVELS or _id(levels[2]) is None:
            return False
        run, where, rest = levels[2], levels[3], levels[4:]
        if self.run_id is not None and run != self.run_id:
            return False
        if where == "status" and len(rest) == 1 and _id(rest[0]):
            if not payload:  # an operator cleared the retained status: the node is gone
                view = self._runs.get(run)
                return view is not None and view.nodes.pop(rest[0], None) is not None
            return self._on_status(run, rest[0], payload)
        header = self._header(payload, run)
        if header is None:
            return False
        if where == "metrics" and not rest:
            return header.get("kind") == "round_result" and self._on_round_result(run, header)
        if where == "instruction" and not rest:
            return self._on_instruction(run, header)
        if where == "instruction" and rest == ["chunk", "0"] and header.get("kind") == "chunk":
            inner = self._header(payload[self._body_start(payload) :], run)
            return inner is not None and inner.get("kind") == "train" and self._on_instruction(run, inner)
        if where == "update" and len(rest) == 1 and _id(rest[0]):
            return self._on_update(run, rest[0], header)
        return False

    @staticmethod
    def _header(payload: bytes, run: str) -> dict[str, Any] | None:
        try:
            header, _ = read_header(payload)
        except ProtocolError:
            return None
        return header if header.get("run") == run and _id(header.get("sender")) else None

    @staticmethod
    def _body_start(payload: bytes) -> int:
        return read_header(payload)[1]

    def _run(self, run: str) -> RunView:
        view = self._runs.get(run)
        if view is None:
            while len(self._runs) >= self.limits.runs:
                self._runs.popitem(last=False)
            view = self._runs[run] = RunView(last_activity=self.clock())
        view.last_activity = self.clock()
        self._runs.move_to_end(run)
        return view

    def _on_status(self, run: str, node: str, payload: bytes) -> bool:
        header = self._header(payload, run)
        data = header.get("data") if header else None
        if (
            header is None
            or header.get("kind") != "status"
            or header.get("sender") != node
            or not isinstance(data, dict)
        ):
            return False
        seen = {
            "state": _text(data.get("state"), self.limits),
            "sent_at": _number(header.get("sent_at")),
        }
        if data.get("role") == "coordinator":
            self._run(run).coordinator = {"node": node, **seen, "round": _int(data.get("round"))}
            return True
        where = [d for d in (data.get("health"), data.get("capabilities"), data) if isinstance(d, dict)]
        health = {
            name: next(
                (value for d in where for k in keys if (value := _scalar(d.get(k), self.limits)) is not None), None
            )
            for name, keys in HEALTH_KEYS.items()
        }
        view = self._run(run)
        if node not in view.nodes:
            while len(view.nodes) >= self.limits.nodes_per_run:
                view.nodes.popitem(last=False)
        # The offline status (the Last Will) carries only state and last round: the recipe and health last
        # announced stay on show, as what the node reported when it was last online.
        before = view.nodes.get(node, {})
        details = {"recipe": _text(data.get("recipe"), self.limits), **health}
        view.nodes[node] = {
            "node": node,
            **seen,
            "last_round_trained": _int(data.get("last_round_trained"), low=-1),
            **{key: before.get(key) if value is None else value for key, value in details.items()},
        }
        view.nodes.move_to_end(node)
        return True

    def _on_instruction(self, run: str, header: dict[str, Any]) -> bool:
        kind, round_, data = header.get("kind"), _int(header.get("round")), header.get("data")
        if kind == "finished":
            view = self._run(run)
            view.finished = True
            return True
        if kind not in ("train", "chunk") or round_ is None or not isinstance(data, dict):
            return False
        view = self._runs.get(run)
        current = view.open_round if view else None
        if current is not None and round_ < current.round:
            return False  # an older instruction (a retained chunk slot left over): not news
        if kind == "chunk":
            # The last chunk of a large instruction: it names the round but not the selection.
            if current is not None and current.round == round_:
                return False
            self._run(run).open_round = OpenRound(round_, "", None, None)
            return True
        msg_id = _text(header.get("msg_id"), self.limits) or ""
        if current is not None and current.round == round_ and current.msg_id == msg_id:
            return False  # the retained instruction again (after a reconnect)
        selected = data.get("selected")
        ids = [n for n in selected[: self.limits.nodes_per_run] if _id(n)] if isinstance(selected, list) else None
        view = self._run(run)
        view.finished = False
        keep = current.answered if current is not None and current.round == round_ and not current.msg_id else {}
        view.open_round = OpenRound(round_, msg_id, ids, _number(data.get("deadline")), keep)
        return True

    def _on_update(self, run: str, node: str, header: dict[str, Any]) -> bool:
        # A whole update, or the last chunk of one: either way the node has sent its answer.
        view = self._runs.get(run)
        current = view.open_round if view else None
        if (
            current is None
            or header.get("kind") not in ("update", "chunk")
            or header.get("sender") != node
            or _int(header.get("round")) != current.round
            or (node not in current.answered and len(current.answered) >= self.limits.nodes_per_run)
        ):
            return False
        current.answered.setdefault(node, self.clock())
        self._run(run)
        return True

    def _on_round_result(self, run: str, header: dict[str, Any]) -> bool:
        data = header.get("data")
        record = self._round_record(data) if isinstance(data, dict) else None
        if record is None:
            return False
        rounds = self._run(run).rounds
        rounds[record["round"]] = record
        while len(rounds) > self.limits.rounds_per_run:
            del rounds[min(rounds)]
        return True

    def _round_record(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """The fields of a RoundRecord (flora/records.py) the page shows, each checked. Not RoundRecord.from_dict:
        it keeps whatever types arrive, and every strategy metric, unbounded."""
        round_ = _int(data.get("round"), low=1)
        if round_ is None:
            return None
        accepted = data.get("accepted")
        rejected = data.get("rejected")
        reasons = {}
        if isinstance(rejected, dict):
            for reason, count in list(rejected.items())[: self.limits.reasons]:
                if _int(count) is not None:
                    reasons[reason[: self.limits.text]] = count
        return {
            "round": round_,
            "rounds_total": _int(data.get("rounds_total")),
            "selected": _int(data.get("selected")),
            "participants": _int(data.get("participants")),
            "accepted": [n for n in accepted[: self.limits.nodes_per_run] if _id(n)]
            if isinstance(accepted, list)
            else [],
            "rejected": reasons,
            **{key: _number(data.get(key)) for key in ("accuracy", "loss", "train_loss", "seconds")},
            "bytes_up": _int(data.get("bytes_up")),
            "bytes_down": _int(data.get("bytes_down")),
            "received_at": self.clock(),
        }

    # -- output --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows, as strict JSON values (no NaN), most recently active run first."""
        with self._lock:
            now = self.clock()
            runs = [self._run_snapshot(run, view, now) for run, view in reversed(self._runs.items())]
            return {
                "now": now,
                "started_at": self.started_at,
                "messages": self.messages,
                "ignored": self.ignored,
                "limits": dataclasses.asdict(self.limits),
                "runs": runs,
            }

    def _run_snapshot(self, run: str, view: RunView, now: float) -> dict[str, Any]:
        rounds = [view.rounds[r] for r in sorted(view.rounds)]
        return {
            "run": run,
            "finished": view.finished,
            "coordinator": view.coordinator,
            "nodes": sorted(view.nodes.values(), key=lambda n: n["node"]),
            "rounds": rounds,
            "current": self._current(view, now),
        }

    @staticmethod
    def _current(view: RunView, now: float) -> dict[str, Any] | None:
        """The open round's progress. Before its record arrives: answered, waiting, or late (the deadline has
        passed on this machine's clock). After: accepted, rejected (answered, not accepted) or missing."""
        current = view.open_round
        if current is None:
            return None
        record = view.rounds.get(current.round)
        latest = view.rounds[max(view.rounds)] if view.rounds else None
        overdue = current.deadline is not None and now > current.deadline
        progress = []
        for node in current.selected or []:
            if record is not None:
                state = (
                    "accepted" if node in record["accepted"] else "rejected" if node in current.answered else "missing"
                )
            else:
                state = "answered" if node in current.answered else "late" if overdue else "waiting"
            progress.append({"node": node, "state": state})
        unselected = [n for n in current.answered if current.selected is not None and n not in current.selected]
        return {
            "round": current.round,
            "complete": record is not None,
            "deadline": current.deadline,
            "selected_known": current.selected is not None,
            "selected": len(current.selected) if current.selected is not None else None,
            "answered": len(current.answered),
            "late": sum(p["state"] in ("late", "missing") for p in progress),
            "nodes": progress,
            "unselected_answers": len(unselected),
            "rejected": (record or latest or {}).get("rejected", {}),
            "rejected_round": (record or latest or {}).get("round"),
        }
