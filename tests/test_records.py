"""RoundRecord and RunReport: the JSON boundary (wire, state.json, report.json) and reading old checkpoints."""

from __future__ import annotations

import json
import math

from flora.records import RoundRecord, RunReport


def record(round_: int = 1, **fields) -> RoundRecord:
    values = dict(
        round=round_,
        rounds_total=3,
        attempts=1,
        selected=3,
        participants=2,
        accepted=("client-0", "client-1"),
        rejected={"duplicate": 1},
        accuracy=0.5,
        loss=1.25,
        train_loss=1.5,
        num_examples=240,
        client_peak_memory_mb=812.0,
        aggregation_error=0.003,
        strategy_metrics={"server_lr": 0.1, "clipped": 1},
        bytes_up=2048,
        bytes_down=4096,
        seconds=1.5,
    )
    values.update(fields)
    return RoundRecord(**values)


def test_a_round_record_round_trips_with_strategy_metrics_flat():
    original = record()
    data = original.to_dict()
    assert data["server_lr"] == 0.1 and "strategy_metrics" not in data  # report.json keeps today's flat keys
    assert RoundRecord.from_dict(json.loads(json.dumps(data))) == original


def test_non_finite_values_become_null_in_strict_json():
    overflowed = record(train_loss=math.inf, loss=math.nan, strategy_metrics={"server_lr": -math.inf})
    text = json.dumps(overflowed.to_dict(), allow_nan=False)  # raises on inf/NaN
    data = json.loads(text)
    assert data["train_loss"] is None and data["loss"] is None and data["server_lr"] is None
    report = RunReport("r", "0.1.0", "m", "paper", "fedavg", 3, initial={"accuracy": math.nan}, rounds=(overflowed,))
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False))["initial_accuracy"] is None


def test_history_from_a_checkpoint_written_before_the_typed_record_is_read():
    old = {  # a state.json history entry of an earlier release: plain dict, no aggregation_error yet
        "round": 2,
        "rounds_total": 5,
        "attempts": 1,
        "selected": 2,
        "participants": 2,
        "accepted": ["a", "b"],
        "rejected": {},
        "accuracy": 0.7,
        "loss": 0.9,
        "train_loss": 1.0,
        "num_examples": 100,
        "momentum_norm": 0.25,
        "bytes_up": 10,
        "bytes_down": 20,
        "seconds": 3.0,
    }
    parsed = RoundRecord.from_dict(old)
    assert parsed.accepted == ("a", "b") and parsed.aggregation_error is None
    assert parsed.strategy_metrics == {"momentum_norm": 0.25}
    assert {k: v for k, v in parsed.to_dict().items() if k in old} == old


def test_a_run_report_derives_its_totals_and_round_trips():
    report = RunReport(
        "r",
        "0.1.0",
        "model-dir",
        "paper",
        "fedavg",
        3,
        initial={"accuracy": 0.25, "loss": 2.0},
        rounds=(record(1), record(2, accuracy=0.75)),
        rejections={"duplicate": 2},
        extras={"note": "kept"},
    )
    data = report.to_dict()
    assert data["initial_accuracy"] == 0.25 and data["final_accuracy"] == 0.75
    assert data["bytes_up_total"] == 4096 and data["bytes_down_total"] == 8192 and data["note"] == "kept"
    assert RunReport.from_dict(json.loads(json.dumps(data))) == report
