"""Every update is checked before it touches the aggregate; a rejection names its reason."""

from __future__ import annotations

import math

import numpy as np

from flora.algorithms import ClientUpdate, Tensors
from flora.errors import ProtocolError, RejectReason
from flora.modeling.adapter import check_adapter_tensors, lower_rank_of
from flora.modeling.lora_factors import fit_to_rank
from flora.protocol import Envelope, adapter_from_body
from flora.protocol.schema import MAX_NUM_EXAMPLES, check_data

__all__ = ["MAX_NUM_EXAMPLES", "validate_update"]


def check_update_identity(env: Envelope, *, topic_node: str, run_id: str, round_: int, when: str) -> None:
    """An update's kind, its sender against the topic it came on, its run, and its round (`round_`; `when`
    says which round that is, for the message). Raises ProtocolError with the reason."""
    if env.kind != "update":
        raise ProtocolError(RejectReason.MALFORMED, f"expected an update, got {env.kind!r}")
    if env.sender != topic_node:
        raise ProtocolError(RejectReason.MALFORMED, f"sender {env.sender!r} published on {topic_node!r}'s topic")
    if env.run != run_id:
        raise ProtocolError(RejectReason.WRONG_RUN, f"update for run {env.run!r}, this is {run_id!r}")
    if env.round != round_:
        raise ProtocolError(RejectReason.WRONG_ROUND, f"update for round {env.round}, {when}")


def validate_update(
    env: Envelope,
    *,
    topic_node: str,
    run_id: str,
    round_: int,
    selected: set[str],
    already: set[str],
    global_tensors: Tensors,
    max_update_norm: float | None = None,
    payload_bytes: int = 0,
    allow_lower_rank: bool = False,
) -> ClientUpdate:
    check_update_identity(env, topic_node=topic_node, run_id=run_id, round_=round_, when=f"round {round_} is open")
    if env.sender not in selected:
        raise ProtocolError(RejectReason.NOT_SELECTED, f"{env.sender} was not selected for round {round_}")
    if env.sender in already:
        raise ProtocolError(RejectReason.DUPLICATE, f"{env.sender} already sent an update for round {round_}")
    data = check_data("update", env.data, sender=env.sender)  # num_examples and metrics: bad_metrics (§5.3)
    tensors = adapter_from_body(env.body, env.body_meta)  # format, dtype, finiteness
    check_adapter_tensors(global_tensors, tensors, allow_lower_rank=allow_lower_rank)  # names and shapes
    rank = lower_rank_of(global_tensors, tensors) if allow_lower_rank else None
    if rank is not None and any(tensors[k].shape != v.shape for k, v in global_tensors.items()):
        global_tensors = fit_to_rank(global_tensors, rank)  # a lower-rank client's change is measured from its start
    if max_update_norm is not None:
        norm = math.sqrt(sum(float(np.sum((tensors[k] - global_tensors[k]) ** 2)) for k in global_tensors))
        if norm > max_update_norm:
            raise ProtocolError(RejectReason.NORM_BOUND, f"update norm {norm:.4g} exceeds {max_update_norm:.4g}")
    return ClientUpdate(env.sender, round_, tensors, data["num_examples"], data.get("metrics", {}), payload_bytes)
