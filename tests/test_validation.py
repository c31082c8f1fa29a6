"""Coordinator-side validation: each bad update is rejected with its own reason."""

import numpy as np
import pytest

from coordinator.validation import validate_update
from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope, adapter_to_body

GLOBAL = {"x.lora_A.weight": np.zeros((2, 4), np.float32), "x.lora_B.weight": np.zeros((4, 2), np.float32)}


def update(tensors=None, **fields):
    body, meta = adapter_to_body(tensors if tensors is not None else {k: v + 0.1 for k, v in GLOBAL.items()})
    base = dict(kind="update", run="r", sender="c1", round=2, data={"num_examples": 10, "metrics": {}})
    base.update(fields)
    return Envelope(body=body, body_meta=meta, **base)


def check(env, topic_node="c1", already=(), max_norm=None):
    return validate_update(
        env,
        topic_node=topic_node,
        run_id="r",
        round_=2,
        selected={"c1", "c2"},
        already=set(already),
        global_tensors=GLOBAL,
        max_update_norm=max_norm,
    )


def test_a_good_update_is_accepted():
    accepted = check(update())
    assert accepted.node == "c1" and accepted.num_examples == 10
    np.testing.assert_allclose(accepted.tensors["x.lora_A.weight"], 0.1)


@pytest.mark.parametrize(
    ("env", "kwargs", "reason"),
    [
        (update(run="other"), {}, RejectReason.WRONG_RUN),
        (update(round=1), {}, RejectReason.WRONG_ROUND),
        (update(sender="c3"), {"topic_node": "c3"}, RejectReason.NOT_SELECTED),
        (update(), {"topic_node": "c2"}, RejectReason.MALFORMED),  # c1 spoofing c2's topic
        (update(), {"already": {"c1"}}, RejectReason.DUPLICATE),
        (update(data={"num_examples": 0}), {}, RejectReason.BAD_METRICS),
        (update(data={"num_examples": True}), {}, RejectReason.BAD_METRICS),
        (update({"x.lora_A.weight": np.zeros((2, 4))}), {}, RejectReason.TENSOR_NAMES),
        (
            update({"x.lora_A.weight": np.zeros((3, 4)), "x.lora_B.weight": np.zeros((4, 2))}),
            {},
            RejectReason.TENSOR_SHAPES,
        ),
        (
            update({"x.lora_A.weight": np.full((2, 4), np.inf), "x.lora_B.weight": np.zeros((4, 2))}),
            {},
            RejectReason.NON_FINITE,
        ),
        (update({k: v + 100 for k, v in GLOBAL.items()}), {"max_norm": 10.0}, RejectReason.NORM_BOUND),
    ],
)
def test_bad_updates_are_rejected_with_their_reason(env, kwargs, reason):
    with pytest.raises(ProtocolError) as info:
        check(env, **{"topic_node": env.sender, **kwargs})
    assert info.value.reason is reason


def test_hostile_metrics_cannot_break_aggregation_or_the_checkpoint():
    import json

    # Metrics nothing reads: kept only as bounded finite numbers; strings, booleans, NaN and 1e300 are dropped.
    raw = json.loads('{"train_loss": 0.5, "seconds": 1.5, "flag": true, "kind": "x", "odd": NaN, "huge": 1e300}')
    accepted = check(update(data={"num_examples": 10, "metrics": raw}))
    assert accepted.metrics == {"train_loss": 0.5, "seconds": 1.5}
    # Metrics the round record reads: one that is not a finite number in its range rejects the update, with why.
    for bad in ('{"train_loss": NaN}', '{"train_loss": 1e308}', '{"peak_memory_mb": "lots"}', '{"peak_memory_mb": -1}'):
        with pytest.raises(ProtocolError) as info:
            check(update(data={"num_examples": 10, "metrics": json.loads(bad)}))
        assert info.value.reason is RejectReason.BAD_METRICS
        assert "metrics entry" in info.value.detail and "finite number" in info.value.detail
