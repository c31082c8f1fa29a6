"""What each message kind's `data` may hold: one declarative table per kind, checked before a role reads it.

Everything in `data` comes from the network. `check_data(kind, data)` checks every declared field by type and
range and returns a cleaned copy holding only the declared fields that were present (so a missing optional
field stays missing, never a made-up zero). A field that breaks its rule raises ProtocolError with the field's
reason and a message naming the field, the rule and the value. The two maps of scalars a device reports
(`update.metrics`, `status.capabilities`) are cleaned entry by entry: known keys have their own rules, other
keys are kept only as bounded finite scalars, so nothing a device sends can overflow a sum or make the JSON
written to disk fail. docs/PROTOCOL.md §5 documents the same rules.
"""

from __future__ import annotations

import contextvars
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flora.errors import ProtocolError, RejectReason
from flora.protocol.envelope import check_id

log = logging.getLogger(__name__)

MAX_ROUND = 10**9
MAX_NUM_EXAMPLES = 10**9
MAX_MAP_ENTRIES = 64  # metrics and capabilities keep at most this many entries
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 256
MAX_ABS_NUMBER = 1e15  # an unknown numeric metric or capability beyond this is dropped: nothing real is that big
MAX_LOSS = 1e6  # |train_loss|: far above any real loss, far below what overflows once weighted by 10^9 examples
MAX_MEMORY_MB = 1e9  # a petabyte
MAX_SELECTED = 100_000
MAX_RANK = 65536
MAX_NOTICE_CHARS = 512  # a reject notice's detail and fix

_SOURCE = contextvars.ContextVar("schema_source", default="")  # who sent the message checked now, for log lines

Check = Callable[[Any], Any]  # value -> cleaned value; raises ValueError saying what is accepted


class Rule(ValueError):
    """A value broke its field's rule; the message says what is accepted."""


def _describe(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else f"{shown[:77]}..."


def integer(lo: int, hi: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise Rule(f"must be an integer in [{lo}, {hi:.4g}], got {_describe(value)}")
        return value

    return check


def number(lo: float, hi: float, *, above_lo: bool = False) -> Check:
    """A finite JSON number in [lo, hi] (or (lo, hi] with `above_lo`)."""
    bracket = "(" if above_lo else "["

    def check(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        # float() of an integer of 400 digits overflows: it is not finite either
        cleaned = (float(value) if abs(value) < 1e300 else math.inf) if ok else math.nan
        if not (math.isfinite(cleaned) and (lo < cleaned if above_lo else lo <= cleaned) and cleaned <= hi):
            raise Rule(f"must be a finite number in {bracket}{lo:.4g}, {hi:.4g}], got {_describe(value)}")
        return cleaned

    return check


def text(max_chars: int = MAX_TEXT_CHARS, choices: tuple[str, ...] = ()) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value) > max_chars or (choices and value not in choices):
            rule = f"one of {', '.join(choices)}" if choices else f"a string of at most {max_chars} characters"
            raise Rule(f"must be {rule}, got {_describe(value)}")
        return value

    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Rule(f"must be true or false, got {_describe(value)}")
    return value


def node_ids(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_SELECTED:
        raise Rule(f"must be a list of at most {MAX_SELECTED} node ids, got {_describe(value)}")
    for item in value:
        try:
            check_id(item, "node id")
        except ProtocolError as exc:
            raise Rule(exc.detail) from None
    return list(value)


def node_ids_one(value: Any) -> str:
    try:
        return check_id(value, "node id")
    except ProtocolError as exc:
        raise Rule(exc.detail) from None


def pair_of(item: Check) -> Check:
    def check(value: Any) -> tuple:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise Rule(f"must be a list of 2 numbers, got {_describe(value)}")
        return tuple(item(v) for v in value)

    return check


def template(value: Any) -> str:
    """A prompt template: `{label}` is its only placeholder (str.format would raise on "{0}" or "{x}")."""
    text(1000)(value)
    try:
        formatted = value.format(label="\x00")
    except (IndexError, KeyError, ValueError, AttributeError):
        formatted = ""
    if "\x00" not in formatted:
        raise Rule(f"must contain {{label}} and no other placeholder (write {{{{ for a brace), got {_describe(value)}")
    return value


MAX_CLASS_PROMPTS = 2000  # ImageNet-21k-sized label sets are beyond a device's text tower anyway
MAX_PROMPT_CHARS = 300  # CLIP's text tower reads 77 tokens; a longer prompt is truncated anyway


def class_prompts(value: Any) -> list[str]:
    """The run's class prompts (1.2): distinct non-empty strings, bounded in count and length.

    Bounded because every prompt is tokenized and embedded at every local step: an unbounded list from the
    network would cost a device unbounded memory and time.
    """
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CLASS_PROMPTS:
        raise Rule(f"must be a list of 1 to {MAX_CLASS_PROMPTS} prompts, got {_describe(value)}")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_PROMPT_CHARS:
            raise Rule(f"must hold strings of 1 to {MAX_PROMPT_CHARS} characters, got {_describe(item)}")
    if len(set(value)) != len(value):
        raise Rule("must not repeat a prompt (each is one class)")
    return list(value)


def passed_on(value: Any) -> Any:
    """Checked by whoever reads it (client hooks: flora.algorithms.client_hooks_from_instruction)."""
    return value


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = False
    reason: RejectReason = RejectReason.MALFORMED


def fields(spec: Mapping[str, Field], what: str) -> Check:
    """A nested JSON object checked against `spec`."""

    def check(value: Any) -> dict[str, Any]:
        return check_fields(spec, value, what)

    return check


def check_fields(spec: Mapping[str, Field], data: Any, what: str) -> dict[str, Any]:
    """`data` checked against `spec`: the declared fields present (null counts as absent), cleaned."""
    if not isinstance(data, dict):
        raise ProtocolError(RejectReason.MALFORMED, f"{what} must be a JSON object, got {_describe(data)}")
    cleaned: dict[str, Any] = {}
    for name, rule in spec.items():
        value = data.get(name)
        if value is None:
            if rule.required:
                raise ProtocolError(rule.reason, f"{what}.{name} is required")
            continue
        try:
            cleaned[name] = rule.check(value)
        except ProtocolError as exc:  # a nested object: keep its path, use this field's reason
            raise ProtocolError(rule.reason, exc.detail) from None
        except Rule as exc:
            raise ProtocolError(rule.reason, f"{what}.{name} {exc}") from None
    return cleaned


def scalar_map(known: Mapping[str, Check], *, strict: bool, what: str) -> Check:
    """A map of scalars reported by a device (metrics, capabilities).

    Known keys follow their rule: with `strict`, a broken rule rejects the message; otherwise the entry is
    dropped and logged. Other keys are kept only as a finite number within ±MAX_ABS_NUMBER, a bool, or a short
    string (not for `strict` maps, whose values are summed), and at most MAX_MAP_ENTRIES entries in all.
    """

    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise Rule(f"must be a JSON object, got {_describe(value)}")
        cleaned: dict[str, Any] = {}
        dropped: list[str] = []
        for key, item in value.items():
            if len(cleaned) >= MAX_MAP_ENTRIES:
                dropped.append(f"{len(value) - len(cleaned) - len(dropped)} entries over {MAX_MAP_ENTRIES}")
                break
            if item is None:
                continue  # "not known" on the device: the same as absent
            rule = known.get(key)
            try:
                if rule is not None:
                    cleaned[key] = rule(item)
                elif len(key) <= MAX_KEY_CHARS:
                    cleaned[key] = _bounded_scalar(item, numbers_only=strict)
                else:
                    dropped.append(f"a key of {len(key)} characters (at most {MAX_KEY_CHARS})")
            except Rule as exc:
                if strict and rule is not None:
                    raise Rule(f"entry {key!r} {exc}") from None
                dropped.append(f"{key[:MAX_KEY_CHARS]!r} ({exc})")
        if dropped and not strict:
            log.warning("%s%s: dropped %s", what, _SOURCE.get(), "; ".join(dropped[:8]))
        return cleaned

    return check


def _bounded_scalar(value: Any, *, numbers_only: bool) -> Any:
    if isinstance(value, bool):
        if numbers_only:
            raise Rule("must be a number")
        return value
    if isinstance(value, str) and not numbers_only:
        return text()(value)
    return number(-MAX_ABS_NUMBER, MAX_ABS_NUMBER)(value)


# -- the tables ------------------------------------------------------------------------------------

METRICS = {  # update.metrics: the keys the round record reads; a broken rule rejects the update (bad_metrics)
    "train_loss": number(-MAX_LOSS, MAX_LOSS),
    "train_loss_last": number(-MAX_LOSS, MAX_LOSS),
    "peak_memory_mb": number(0, MAX_MEMORY_MB),
}

CAPABILITIES = {  # status.capabilities: what selection and weighting read (§5.1); a broken rule drops the entry
    "dataset_size": integer(0, MAX_NUM_EXAMPLES),
    "memory_total_mb": number(0, MAX_MEMORY_MB),
    "memory_free_mb": number(0, MAX_MEMORY_MB),
    "gpu_memory_total_mb": number(0, MAX_MEMORY_MB),
    "gpu_memory_free_mb": number(0, MAX_MEMORY_MB),
    "supports_4bit": boolean,
    "supports_8bit": boolean,
}

HEALTH = {  # status.health: shown by `flora status` and the dashboard only; a broken rule drops the entry
    "memory_free_mb": number(0, MAX_MEMORY_MB),
    "disk_free_mb": number(0, MAX_MEMORY_MB * 1000),
    "temperature_c": number(-60, 200),
    "gpu_load_pct": number(0, 100),
    "power_mode": text(32),
    "agent_version": text(32),
}

OPTIMIZERS = ("adamw", "sgd")  # train.optimizer (1.3): the clients' local optimizer

TRAIN_SETTINGS = {  # train.train: the local training settings; the client refuses an instruction that breaks one
    "local_epochs": Field(integer(1, 1000)),
    "learning_rate": Field(number(0, 10, above_lo=True)),
    "weight_decay": Field(number(0, 100)),
    "betas": Field(pair_of(number(0, 1 - 1e-9))),  # AdamW refuses a beta of 1
    "eps": Field(number(0, 1, above_lo=True)),
    "batch_size": Field(integer(1, 1_000_000)),
    "prompt_template": Field(template),
    "client_hooks": Field(passed_on),
    "class_prompts": Field(class_prompts),  # 1.2: the run's classes; the local loss contrasts against all of them
    "logit_calibration": Field(number(0, 100)),  # 1.2: FedLC's tau, with class_prompts
    "round_epochs": Field(number(0, 1000, above_lo=True)),  # 1.3: a round's epochs, fractional (over local_epochs)
    "optimizer": Field(text(16, OPTIMIZERS)),  # 1.3: the local optimizer; absent: adamw
    "proximal_mu": Field(passed_on),  # protocol 1.0's spelling of the fedprox hook (§5.2)
    "freeze_lora_a": Field(passed_on),
}

SCHEMAS: dict[str, dict[str, Field]] = {
    "status": {
        "state": Field(text(32, ("online", "offline", "finished")), required=True),
        "last_round_trained": Field(integer(-1, MAX_ROUND)),
        "recipe": Field(text(128)),
        "rank": Field(integer(1, MAX_RANK)),  # 1.2: the LoRA rank the device trains at
        "model_fingerprint": Field(text(64)),  # 1.2: flora.modeling.fingerprint of its base checkpoint
        "instance": Field(text(64)),  # 1.2: random per process: two at once under one node id are two devices
        "capabilities": Field(scalar_map(CAPABILITIES, strict=False, what="status capabilities")),
        "health": Field(scalar_map(HEALTH, strict=False, what="status health")),
        "answers": Field(text(64)),  # 1.2: msg_id of the last presence request this status answers (§5.7)
    },
    "update": {
        "num_examples": Field(integer(1, MAX_NUM_EXAMPLES), required=True, reason=RejectReason.BAD_METRICS),
        "metrics": Field(scalar_map(METRICS, strict=True, what="update metrics"), reason=RejectReason.BAD_METRICS),
        "in_reply_to": Field(text(128)),
    },
    "train": {
        "selected": Field(node_ids, required=True),
        "deadline": Field(number(-1e12, 1e12)),
        "recipe": Field(text(128)),
        "rank": Field(integer(1, MAX_RANK)),  # 1.2: the run's LoRA rank
        "lower_rank_ok": Field(boolean),  # 1.2: the strategy takes updates of a lower rank
        "model_fingerprint": Field(text(64)),  # 1.2: the coordinator's base checkpoint
        "train": Field(fields(TRAIN_SETTINGS, "train.data.train")),
    },
    "round_result": {
        "accepted": Field(node_ids),
    },
    "finished": {
        "rounds": Field(integer(0, MAX_ROUND)),
    },
    "presence": {  # 1.2: "publish your status now"; the reply is rate-limited by the client, whatever this says
        "reply_within_s": Field(number(0, 3600)),
    },
    "reject": {  # 1.2: the coordinator tells one node why its update was refused (topic notice/{node})
        "node": Field(node_ids_one, required=True),
        "reason": Field(text(64), required=True),  # a RejectReason value; an unknown one is shown as it is
        "detail": Field(text(MAX_NOTICE_CHARS)),
        "fix": Field(text(MAX_NOTICE_CHARS)),
    },
}


def check_data(kind: str, data: Any, *, sender: str = "") -> dict[str, Any]:
    """`data` of a message of `kind`, checked against its table and cleaned (declared fields only).

    Raises ProtocolError naming the field and the rule it broke. A kind without a table has nothing to read.
    `sender` only names the source in the log line about dropped map entries.
    """
    token = _SOURCE.set(f" from {sender}" if sender else "")
    try:
        return check_fields(SCHEMAS.get(kind, {}), data, f"{kind}.data")
    finally:
        _SOURCE.reset(token)
