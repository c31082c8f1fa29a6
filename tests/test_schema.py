"""Every message kind's `data` is checked by type and range before a role reads it (flora/protocol/schema.py)."""

import json

import pytest

from flora.errors import ProtocolError, RejectReason
from flora.protocol.schema import check_data


def rejected(kind, data) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        check_data(kind, data)
    return info.value


@pytest.mark.parametrize(
    ("kind", "data", "field"),
    [
        ("train", {"selected": 5}, "selected"),
        ("train", {"selected": ["ok", "no/slash"]}, "node id"),
        ("train", {"selected": ["a"], "train": [1]}, "train.data.train must be a JSON object"),
        ("train", {"selected": ["a"], "train": {"prompt_template": "{0}"}}, "prompt_template"),
        ("train", {"selected": ["a"], "train": {"prompt_template": "no label"}}, "prompt_template"),
        ("train", {"selected": ["a"], "train": {"betas": [0.5]}}, "betas"),
        ("train", {"selected": ["a"], "train": {"betas": [0.9, 1.0]}}, "betas"),
        ("train", {"selected": ["a"], "train": {"learning_rate": 0}}, "learning_rate"),
        ("train", {"selected": ["a"], "train": {"local_epochs": True}}, "local_epochs"),
        ("train", {"selected": ["a"], "deadline": "soon"}, "deadline"),
        ("round_result", {"accepted": 5}, "accepted"),
        ("finished", {"rounds": -1}, "rounds"),
        ("status", {"state": 5}, "state"),
        ("status", {"capabilities": {}}, "state is required"),
        ("status", {"state": "online", "last_round_trained": 1.5}, "last_round_trained"),
    ],
)
def test_a_type_confused_field_is_malformed_and_named(kind, data, field):
    error = rejected(kind, data)
    assert error.reason is RejectReason.MALFORMED
    assert field in error.detail


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"num_examples": 0},
        {"num_examples": 10**9 + 1},
        {"num_examples": 5.0},
        {"num_examples": 5, "metrics": [1]},
        {"num_examples": 5, "metrics": {"train_loss": 1e308}},
        {"num_examples": 5, "metrics": json.loads('{"train_loss": NaN}')},
        {"num_examples": 5, "metrics": {"peak_memory_mb": -3}},
    ],
)
def test_update_counts_and_read_metrics_out_of_range_are_bad_metrics(data):
    assert rejected("update", data).reason is RejectReason.BAD_METRICS


def test_missing_optional_fields_stay_missing_and_unknown_keys_are_not_passed_on():
    assert check_data("update", {"num_examples": 3, "extra": 1}) == {"num_examples": 3}
    assert check_data("round_result", {"round": 2, "accuracy": 0.5}) == {}
    assert check_data("train", {"selected": [], "recipe": None}) == {"selected": []}


def test_capabilities_keep_only_well_formed_finite_entries(caplog):
    caps = json.loads(
        '{"memory_free_mb": NaN, "gpu_memory_free_mb": 1e400, "dataset_size": 500, "supports_4bit": "yes",'
        ' "hostname": "jetson-01", "device_model": null, "note": ["x"], "temp_c": 41.5}'
    )
    cleaned = check_data("status", {"state": "online", "capabilities": caps}, sender="jetson-01")
    assert cleaned["capabilities"] == {"dataset_size": 500, "hostname": "jetson-01", "temp_c": 41.5}
    json.dumps(cleaned, allow_nan=False)  # what the checkpoint writes: never fails on a received value
    (line,) = [r.getMessage() for r in caplog.records]
    assert "from jetson-01" in line and "'memory_free_mb'" in line and "'supports_4bit'" in line


def test_maps_are_bounded_in_entries_and_key_length():
    many = {f"k{i}": i for i in range(200)} | {"x" * 65: 1}
    cleaned = check_data("update", {"num_examples": 1, "metrics": many})["metrics"]
    assert len(cleaned) == 64 and all(isinstance(v, float) for v in cleaned.values())


def test_good_messages_pass_cleaned():
    train = {"local_epochs": 2, "learning_rate": 5e-5, "betas": [0.9, 0.98], "prompt_template": "a {label}."}
    cleaned = check_data("train", {"selected": ["c-1"], "deadline": 1.5e9, "recipe": "paper", "train": train})
    assert cleaned["train"]["betas"] == (0.9, 0.98) and cleaned["selected"] == ["c-1"]
    assert check_data("update", {"num_examples": 7, "metrics": {"train_loss": 1.7, "peak_memory_mb": 10}}) == {
        "num_examples": 7,
        "metrics": {"train_loss": 1.7, "peak_memory_mb": 10.0},
    }
