"""Typed round and run records: what a round produced, and the run's report.

The coordinator builds a `RoundRecord` per round; it travels on the wire (`round_result`), into the
checkpoint's state.json (history) and into report.json. `flora status` and the clients read it back
from the wire, so it lives in the core.

JSON is the boundary: `to_dict()` gives plain JSON-able values and `from_dict()` reads them back,
including the history of checkpoints written before these types existed (plain dicts, possibly
without the newer keys). Values come from devices, so `to_dict()` never fails on one: a non-finite
float (a device's train_loss of 1e308 overflows to inf once weighted) becomes None, which strict JSON
(`allow_nan=False`, what flora.files.atomic_write_json writes) accepts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["RoundRecord", "RunReport", "json_safe"]


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, containers copied (tuples become lists)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars from a strategy's metrics
        return json_safe(value.item())
    return value


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One completed round. `strategy_metrics` are the strategy's own round metrics (server learning rate,
    clipped updates, ...); they are merged flat into `to_dict()` so report.json keeps its keys."""

    round: int
    rounds_total: int
    attempts: int = 1
    selected: int = 0
    participants: int = 0
    accepted: tuple[str, ...] = ()
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)  # reason code -> count, this round
    resent: int = 0  # copies of updates already accepted (recovery re-sends after a restart): not rejections
    accuracy: float | None = None  # held-out, after aggregation; None without evaluation data
    loss: float | None = None
    train_loss: float | None = None  # clients' train loss, weighted by their examples
    num_examples: int = 0
    client_peak_memory_mb: float | None = None
    weights_capped: tuple[str, ...] = ()  # nodes whose FedAvg weight was capped (coordinator/weighting.py)
    aggregation_error: float | None = None  # ||Σw·BA − (Σw·B)(Σw·A)||, see flora/algorithms/lora.py
    strategy_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float | None = None  # round start to aggregation and evaluation (before the checkpoint)

    def to_dict(self) -> dict[str, Any]:
        """The wire and report.json form, keys in the order of the fields, strategy metrics flat where the
        field is. A strategy metric never overrides a field of the record."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "strategy_metrics":
                out.update({k: v for k, v in value.items() if k not in _FIELD_NAMES})
            else:
                out[f.name] = value
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        """Read a record back (state.json history, report.json, a round_result). Keys that are not fields are
        the strategy's metrics; fields that an older checkpoint lacks take their defaults."""
        known = {k: v for k, v in data.items() if k in _FIELD_NAMES and k != "strategy_metrics"}
        extra = {k: v for k, v in data.items() if k not in _FIELD_NAMES}
        extra.update(data.get("strategy_metrics") or {})
        known["accepted"] = tuple(known.get("accepted") or ())
        known["rejected"] = dict(known.get("rejected") or {})
        known["weights_capped"] = tuple(known.get("weights_capped") or ())
        return cls(**known, strategy_metrics=extra)


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(RoundRecord))


@dataclasses.dataclass(frozen=True)
class RunReport:
    """The run so far (report.json): its settings, the initial evaluation and every round's record.

    `extras` are further top-level keys (merged flat into `to_dict()`, never over a field)."""

    run_id: str
    toolkit_version: str
    model: str
    recipe: str
    strategy: dict[str, Any] | str  # Strategy.describe(): what ran; a bare name in old reports
    rounds_planned: int
    initial: dict[str, Any] | None = None  # evaluation before federation; None without evaluation data
    rounds: tuple[RoundRecord, ...] = ()
    rejections: dict[str, int] = dataclasses.field(default_factory=dict)  # reason code -> count, whole run
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def initial_accuracy(self) -> float | None:
        return (self.initial or {}).get("accuracy")

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].accuracy if self.rounds else None

    @property
    def bytes_up_total(self) -> int:
        return sum(r.bytes_up for r in self.rounds)

    @property
    def bytes_down_total(self) -> int:
        return sum(r.bytes_down for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "run_id": self.run_id,
            "toolkit_version": self.toolkit_version,
            "model": self.model,
            "recipe": self.recipe,
            "strategy": self.strategy,
            "rounds_planned": self.rounds_planned,
            "initial": self.initial,
            "initial_accuracy": self.initial_accuracy,
            "rounds": [r.to_dict() for r in self.rounds],
            "final_accuracy": self.final_accuracy,
            "rejections": dict(self.rejections),
            "bytes_up_total": self.bytes_up_total,
            "bytes_down_total": self.bytes_down_total,
        }
        out.update({k: v for k, v in self.extras.items() if k not in out})
        return json_safe(out)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunReport:
        derived = {"initial_accuracy", "final_accuracy", "bytes_up_total", "bytes_down_total"}
        fields = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        known = {k: v for k, v in data.items() if k in fields}
        known["rounds"] = tuple(RoundRecord.from_dict(r) for r in data.get("rounds", ()))
        known["rejections"] = dict(data.get("rejections") or {})
        extras = {k: v for k, v in data.items() if k not in fields and k not in derived}
        return cls(**known, extras=extras)
