"""Labelled image datasets on local disk, and CLIP preprocessing into a pixel tensor.

A dataset here is just images plus integer labels plus class names; the class name fills the
prompt template. Unreadable images are skipped and counted, never allowed to crash a round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flora.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class LabeledImages:
    images: list[Any]  # PIL images, RGB
    labels: np.ndarray  # int64, index into class_names
    class_names: list[str]
    skipped: int = 0  # unreadable files passed over while loading
    skipped_files: list[str] = field(default_factory=list)
    # "class": class_names fill the prompt template. "caption": image-text pairs; class_names holds each
    # distinct caption once and is used verbatim (labels index it), so the same loss code serves both.
    text_kind: str = "class"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        return LabeledImages(
            [self.images[i] for i in indices],
            self.labels[np.asarray(indices)],
            self.class_names,
            text_kind=self.text_kind,
        )

    def texts(self, template: str) -> list[str]:
        """The distinct texts `labels` index: class prompts from `template`, or the captions themselves."""
        if self.text_kind == "caption":
            return list(self.class_names)
        return [template.format(label=name) for name in self.class_names]


def load_image_folder(root: str | Path) -> LabeledImages:
    """One subfolder per class (its name is the label text), images inside. Sorted, so stable."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; set data_dir to a folder with one subfolder per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    images, labels, skipped = [], [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    images.append(img.convert("RGB"))
                labels.append(label)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                skipped.append(str(file))
                log.warning("skipping unreadable image %s: %s", file, exc)
    if not images:
        raise DataError(f"no readable images under {root} ({len(skipped)} unreadable); check the files")
    return LabeledImages(
        images, np.asarray(labels, dtype=np.int64), [d.name for d in class_dirs], len(skipped), skipped
    )


def write_image_folder(data: LabeledImages, root: str | Path) -> Path:
    """Write images as PNG files into one subfolder per class (used by the demo to stage client data)."""
    root = Path(root)
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
        class_dir = root / data.class_names[int(label)]
        class_dir.mkdir(parents=True, exist_ok=True)
        image.save(class_dir / f"{i:05d}.png")
    return root


def pixel_values(image_processor: Any, images: Sequence[Any], *, batch_size: int = 512):
    """Preprocess PIL images into a float tensor [N, 3, H, W] with the checkpoint's own processor."""
    import torch

    chunks = []
    for start in range(0, len(images), batch_size):
        batch = image_processor(images=list(images[start : start + batch_size]), return_tensors="np")
        chunks.append(torch.from_numpy(np.asarray(batch["pixel_values"], dtype=np.float32)))
    if not chunks:
        raise DataError("no images to preprocess")
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)  # cat would copy even a single chunk
