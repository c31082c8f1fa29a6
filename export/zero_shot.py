"""The zero-shot head: a label set's text embeddings, precomputed, so a device needs only the vision model.

Stored as one .npz (no pickle: labels are a unicode array, settings a JSON string) holding
`embeddings` [num_labels, dim] (L2-normalised float32), `logit_scale` (already exp()'d, as
CLIPModel multiplies by it), `logit_bias` (SigLIP's; 0 for CLIP), `labels` and the prompt template
they were made with.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flora.errors import ConfigError
from flora.files import atomic_write_bytes

HEAD_FILE = "zero_shot_head.npz"


@dataclass
class ZeroShotHead:
    labels: list[str]
    embeddings: np.ndarray  # [num_labels, dim], rows of unit length
    logit_scale: float
    prompt_template: str
    info: dict[str, Any] = field(default_factory=dict)  # provenance: base model, adapter sha256, ...
    logit_bias: float = 0.0  # added to every logit (SigLIP); CLIP has none

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != len(self.labels):
            raise ConfigError(
                f"zero-shot head: {len(self.labels)} labels but embeddings of shape {self.embeddings.shape}"
            )

    def logits(self, image_embeds: np.ndarray) -> np.ndarray:
        """The model's logits_per_image for these labels: scale * cosine similarity (+ bias)."""
        return self.logit_scale * np.asarray(image_embeds, dtype=np.float32) @ self.embeddings.T + self.logit_bias

    def save(self, path: str | Path) -> Path:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            embeddings=self.embeddings,
            logit_scale=np.float32(self.logit_scale),
            logit_bias=np.float32(self.logit_bias),
            labels=np.asarray(self.labels, dtype=str),
            settings=np.asarray(json.dumps({"prompt_template": self.prompt_template, **self.info})),
        )
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> ZeroShotHead:
        try:
            with np.load(path, allow_pickle=False) as data:
                settings = json.loads(str(data["settings"]))
                return cls(
                    labels=[str(label) for label in data["labels"]],
                    embeddings=data["embeddings"],
                    logit_scale=float(data["logit_scale"]),
                    prompt_template=settings.pop("prompt_template"),
                    info=settings,
                    logit_bias=float(data["logit_bias"]) if "logit_bias" in data.files else 0.0,  # older heads
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path} is not a zero-shot head written by `flora export`: {exc}") from None


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def read_labels(path: str | Path) -> list[str]:
    """One label per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels file {path} does not exist; write one class name per line")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label and not label.startswith("#")]
    if not labels:
        raise ConfigError(f"labels file {path} has no labels; write one class name per line")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ConfigError(f"labels file {path} repeats {duplicates[:5]}; each class must appear once")
    return labels


def class_prompts(labels: Sequence[str], template: str) -> list[str]:
    if "{label}" not in template:
        raise ConfigError(f"prompt template {template!r} has no {{label}} placeholder, e.g. 'a photo of a {{label}}.'")
    return [template.format(label=label) for label in labels]
