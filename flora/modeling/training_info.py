"""What an adapter was trained with, beside its weights: the prompt template and the class names.

Zero-shot classification is only as good as the prompts: the same adapter scores differently under
another template (the demo's: 77.7% with its training prompt, 72.7% with the default). So the
coordinator writes `flora_training.json` into every adapter directory it saves, report.json repeats it,
and `flora export` and `flora infer` use it unless told otherwise (and warn when told otherwise).
PEFT ignores the extra file: `PeftModel.from_pretrained(base, dir)` still loads the directory as it is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

TRAINING_INFO_FILE = "flora_training.json"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingInfo:
    prompt_template: str
    class_names: tuple[str, ...] | None = None  # the coordinator's evaluation classes, when it had evaluation data
    run_id: str | None = None
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["class_names"] = list(self.class_names) if self.class_names is not None else None
        return out

    @classmethod
    def read(cls, adapter_dir: str | Path) -> TrainingInfo | None:
        """The adapter's training info, or None when it has none (an adapter from elsewhere, or older)."""
        path = Path(adapter_dir) / TRAINING_INFO_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            names = data.get("class_names")
            info = cls(
                prompt_template=str(data["prompt_template"]),
                class_names=tuple(str(n) for n in names) if isinstance(names, list) else None,
                run_id=data.get("run_id"),
                recipe=data.get("recipe"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring %s: unreadable (%s)", path, exc)
            return None
        return info


def resolve_prompt_template(given: str | None, info: TrainingInfo | None, default: str, *, what: str) -> str:
    """The template to use: the one given, else the one the adapter was trained with, else `default`.

    A given template that differs from the training one is used, with a warning: accuracy usually drops.
    """
    trained = info.prompt_template if info is not None else None
    if given is None:
        return trained or default
    if trained is not None and given != trained:
        log.warning(
            "%s: using the prompt template %r, but the adapter was trained with %r; zero-shot accuracy usually "
            "drops with another prompt (leave --prompt-template out to use the training one)",
            what,
            given,
            trained,
        )
    return given
