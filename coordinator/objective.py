"""The clients' local objective, as the instruction states it (docs/PROTOCOL.md §5.2, `train.class_prompts`).

`class-prompts`: the instruction names every class prompt of the run, so each client contrasts its
images with all classes, also those it holds no example of. Under label skew most clients hold one or two
classes; CLIP's in-batch loss then sees almost no negatives and the clients' updates pull apart. The class names
are not private: the coordinator's evaluation data names them (or the config lists them).
`in-batch` (the default): CLIP's contrastive loss over the texts of each batch only, the paper's, needed for caption
data. It stays the default because the grid (EXPERIMENTS.md) did not measure class-prompts better under label skew.

How much local training a round holds, and with which optimizer, is stated here too (`local_work_settings`): whole
epochs as `local_epochs` or, from protocol 1.3, a fraction of an epoch as `round_epochs` (edge_client/schedule.py
says why fewer local steps per round help under label skew); AdamW, the paper's, or (1.3) plain SGD, whose steps
average into the pooled data's gradient where AdamW's per-client normalised steps do not (FedOpt, Reddi et al.
2021: SGD on the clients, the adaptive step on the server). `protocol_needed` says which clients can follow them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flora.errors import ConfigError
from flora.modeling.scoring import class_prompts
from flora.protocol.schema import MAX_CLASS_PROMPTS, MAX_PROMPT_CHARS, OPTIMIZERS

OBJECTIVES = ("class-prompts", "in-batch")


def check_objective(objective: str, class_names: Sequence[str]) -> None:
    """Raise ConfigError naming the fix for an objective or class list the clients would refuse."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if len(class_names) > MAX_CLASS_PROMPTS:
        raise ConfigError(f"class_names lists {len(class_names)} classes; clients accept at most {MAX_CLASS_PROMPTS}")
    if len(set(class_names)) != len(class_names):
        raise ConfigError("class_names repeats a name; list each class once")


def objective_settings(
    objective: str, class_names: Sequence[str] | None, template: str, logit_calibration: float = 0.0
) -> dict[str, Any]:
    """The instruction's `train` keys for `objective`: {"class_prompts": [...], "logit_calibration": tau} or nothing.

    Without class names (no evaluation data, none configured) there is nothing to send and clients fall back to
    the in-batch loss. Prompts a client would refuse (too long) are a configuration error, said before round 1.
    """
    if objective != "class-prompts" or not class_names:
        return {}
    prompts = class_prompts(list(class_names), template)
    too_long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if too_long:
        raise ConfigError(
            f"class prompt {too_long[0][:60]!r}... is over {MAX_PROMPT_CHARS} characters; shorten the class name "
            "or prompt_template"
        )
    calibration = {"logit_calibration": logit_calibration} if logit_calibration > 0 else {}
    return {"class_prompts": prompts, **calibration}


def local_work_settings(local_epochs: float, optimizer: str = "adamw") -> dict[str, Any]:
    """The instruction's `train` keys for a round of `local_epochs` epochs with `optimizer`: {"local_epochs": 2} for
    whole epochs with AdamW; for a fraction, also {"round_epochs": 0.25} (1.3), `local_epochs` being the fraction
    rounded up, and {"optimizer": "sgd"} (1.3) for SGD. The coordinator selects only clients of 1.3 for either
    (`protocol_needed`): an older one would ignore the keys and train something else."""
    if not local_epochs > 0:
        raise ConfigError(f"local_epochs must be > 0, got {local_epochs}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"client_optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    settings: dict[str, Any] = {"local_epochs": math.ceil(local_epochs)}
    if not float(local_epochs).is_integer():
        settings["round_epochs"] = float(local_epochs)
    if optimizer != "adamw":
        settings["optimizer"] = optimizer
    return settings


# The `train` keys protocol 1.3 added, and the coordinator setting each one states.
_KEYS_OF_1_3 = {"round_epochs": "local_epochs", "optimizer": "client_optimizer"}


def protocol_needed(local_epochs: float, optimizer: str = "adamw") -> tuple[int, str]:
    """The protocol minor a client must speak to follow these settings, and the setting that needs it: read off
    the keys `local_work_settings` sends, so a new key cannot be sent without saying who understands it."""
    settings = local_work_settings(local_epochs, optimizer)
    needs = [f"{setting} = {settings[key]!r}" for key, setting in _KEYS_OF_1_3.items() if key in settings]
    return (3, " and ".join(needs)) if needs else (0, "")
