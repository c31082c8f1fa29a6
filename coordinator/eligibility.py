"""Which online nodes the coordinator can use, and for each one it cannot, why (protocol 1.2 status fields).

A node that is online but unusable used to be left out silently: the operator saw "only 3 of 4 required eligible
clients" with four devices online. Now each reason is named, in the log when the node's status says so and in
that message. A node is not used when (in this order):

- its recipe is not the run's;
- its base model fingerprint (flora.modeling.fingerprint) is not the coordinator's: same shapes, other weights;
- its LoRA rank is not the run's (a lower one is fine when the strategy takes lower ranks, e.g. svd_lora);
- it already trained a round past the one about to open (its progress is of an earlier run with this run id: it
  would ignore the instruction);
- it does not meet min_client_memory_mb or require_4bit;
- its status is written in a protocol minor older than the run's settings need (e.g. 1.3's `round_epochs`, or
  the `optimizer` a client of 1.2 would not read and would train the run's SGD learning rate with AdamW).

A field the node does not announce (an older client) is not held against it, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from coordinator.registry import NodeInfo, Requirements


@dataclass(frozen=True)
class Eligibility:
    run_id: str
    recipe: str
    rank: int
    accepts_lower_rank: bool
    fingerprint: str | None
    model: str
    requirements: Requirements
    needs_minor: int = 0  # the protocol minor the run's instruction needs its clients to read (§9)
    needs_because: str = ""  # the setting that needs it, for the reason logged

    def why_not(self, info: NodeInfo, round_: int) -> str | None:
        """None if `info` can take part in `round_`, else the reason and the fix, in a few words."""
        if info.recipe is not None and info.recipe != self.recipe:
            return f"recipe {info.recipe!r}, the run's is {self.recipe!r} (set recipe in its client config)"
        if info.fingerprint is not None and self.fingerprint is not None and info.fingerprint != self.fingerprint:
            return (
                f"base model fingerprint {info.fingerprint}, the coordinator's {self.model} is {self.fingerprint} "
                "(it loads another checkpoint: install the run's)"
            )
        if info.rank is not None and info.rank != self.rank and not (info.rank < self.rank and self.accepts_lower_rank):
            lower = "" if info.rank > self.rank else "; or run strategy svd_lora, which takes lower ranks"
            return f"LoRA rank {info.rank}, the run's is {self.rank} (set lora_rank = {self.rank} or remove it{lower})"
        if info.last_round_trained is not None and info.last_round_trained > round_:
            return (
                f"it already trained round {info.last_round_trained} of run {self.run_id}, past round {round_}: it "
                "ignores rounds it believes done (a reused run_id? give the run a new one, or clear the device's "
                "state_dir)"
            )
        if info.protocol_minor is not None and info.protocol_minor < self.needs_minor:
            return (
                f"it speaks protocol 1.{info.protocol_minor}, and {self.needs_because} needs 1.{self.needs_minor} "
                "(upgrade flora-edge on it, or change that setting)"
            )
        return self.requirements.why_not(info.capabilities)


def summarize(reasons: dict[str, str], limit: int = 5) -> str:
    """'a (why); b (why) and 3 more' for a log line of bounded length."""
    shown = [f"{node} ({why})" for node, why in sorted(reasons.items())[:limit]]
    more = f" and {len(reasons) - limit} more" if len(reasons) > limit else ""
    return "; ".join(shown) + more
