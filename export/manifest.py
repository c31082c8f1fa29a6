"""flora_export.json: what an export directory holds, read by `flora infer` (no PyTorch needed).

It names each ONNX file by part and precision with its validation verdict, the zero-shot head,
the prompt template and logit scale, and keeps the full validation report for humans. The
runtime only trusts files listed here, so a stale file left by an older export is never picked up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flora.errors import ConfigError
from flora.files import atomic_write_json

MANIFEST_FILE = "flora_export.json"
FORMAT_VERSION = 1


@dataclass
class Manifest:
    base_model: str
    adapter_sha256: str
    recipe: str
    merge_base: str
    prompt_template: str
    logit_scale: float
    max_text_length: int | None
    # files[part][precision] = {"file": ..., "bytes": ..., "passed": bool} (+ "int8_scheme" for int8)
    files: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    family: str = "clip"  # flora.modeling.families name: tokenizer padding, preprocessing defaults
    logit_bias: float = 0.0  # added to every logit (SigLIP); exports before families had none
    zero_shot_head: str | None = None
    flora_version: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> Path:
        path = Path(out_dir) / MANIFEST_FILE
        atomic_write_json(path, {"format": FORMAT_VERSION, **self.__dict__})
        return path

    @classmethod
    def read(cls, model_dir: str | Path) -> Manifest:
        path = Path(model_dir) / MANIFEST_FILE
        if not path.is_file():
            raise ConfigError(
                f"{model_dir} has no {MANIFEST_FILE}; point --model at a directory written by `flora export` "
                "(re-run it if this export predates the manifest)"
            )
        data = json.loads(path.read_text())
        if data.pop("format", None) != FORMAT_VERSION:
            raise ConfigError(f"{path} has an unknown format; re-export with this version of flora")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def available(self, part: str) -> list[str]:
        """Precisions exported for `part`, in the order fp32, int8, fp16."""
        have = self.files.get(part, {})
        return [p for p in ("fp32", "int8", "fp16") if p in have]
