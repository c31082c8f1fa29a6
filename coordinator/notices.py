"""What the coordinator tells one node: a `reject` notice (docs/PROTOCOL.md §5.8) with the reason and the fix.

The fix is written here, where the reason is known, so a third-party client need only print it. It names the
cause the check found (the LoRA rank when only the rank differs, not the recipe), and the setting to change.
"""

from __future__ import annotations

from typing import Any

from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope
from flora.protocol.schema import MAX_NOTICE_CHARS

_FIXES = {
    RejectReason.MALFORMED: "the update could not be read; run the same flora-edge version as the coordinator",
    RejectReason.CHECKSUM: "the update was damaged in transit; check the broker's size limit (max_message_bytes)",
    RejectReason.TENSOR_NAMES: "set recipe = {recipe!r} in the client config (the run's recipe), and use the run's "
    "base model ({model})",
    RejectReason.TENSOR_SHAPES: "set recipe = {recipe!r} in the client config and use the run's base model ({model})",
    RejectReason.TENSOR_DTYPE: "set wire_encoding to one the coordinator reads (float32 always works)",
    RejectReason.NON_FINITE: "local training diverged: lower learning_rate on the coordinator, or check the device's "
    "data and quantization",
    RejectReason.NORM_BOUND: "the update moved further than max_update_norm allows: lower the learning rate or local "
    "epochs, or raise max_update_norm on the coordinator",
    RejectReason.BAD_METRICS: "the update's num_examples or metrics are out of range; check the device's data",
    RejectReason.UNSIGNED: "set signing_key in the client config to the device key `flora provision` wrote",
    RejectReason.BAD_SIGNATURE: "the device key does not match the one the coordinator holds; re-provision the device "
    "(flora provision --force NODE) and install its new key",
    RejectReason.REPLAYED: "the update answered an instruction this coordinator did not send; restart the client",
}


def rank_fix(detail: str, accepts_lower_rank: bool) -> str | None:
    """For a rank mismatch (flora.modeling.adapter.check_adapter_tensors says "LoRA rank R, the run's rank is G")."""
    if not detail.startswith("LoRA rank "):
        return None
    want = detail.split("the run's rank is ", 1)[-1].split(" ", 1)[0]
    lower = "" if accepts_lower_rank else ' (devices at a lower rank need strategy = "svd_lora" on the coordinator)'
    return f"set lora_rank = {want} in the client config, or remove lora_rank to train at the recipe's rank{lower}"


def reject_notice(config: Any, node: str, round_: int, exc: ProtocolError, accepts_lower_rank: bool) -> Envelope:
    fix = rank_fix(exc.detail, accepts_lower_rank) or _FIXES.get(exc.reason, "check the client's log and config")
    fix = fix.format(recipe=config.recipe, model=config.model)
    return Envelope(
        kind="reject",
        run=config.run_id,
        sender=config.node_id,
        round=round_,
        data={
            "node": node,
            "reason": exc.reason.value,
            "detail": exc.detail[:MAX_NOTICE_CHARS],
            "fix": fix[:MAX_NOTICE_CHARS],
        },
    )
