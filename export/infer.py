"""`flora infer`: classify image files with an exported model, ONNX Runtime only (no PyTorch import).

Images are read and embedded a batch at a time, so a large folder never sits in memory at
once. An unreadable file is reported in the output's `errors` and skipped, not fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.runtime import OnnxClip
from export.zero_shot import read_labels, softmax
from flora.errors import DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, plus every image under named folders (recursive, sorted)."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"{item} does not exist; pass image files or folders of images")
    if not found:
        raise DataError(
            f"no images found in {', '.join(map(str, inputs))} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return found


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()  # keep the mode: preprocessing composites transparency onto white


def classify(
    model: OnnxClip,
    paths: Sequence[Path],
    labels: Sequence[str] | None = None,
    *,
    prompt_template: str | None = None,
    top_k: int = 5,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Top-k labels with softmax scores per image, ready to print as JSON."""
    from PIL import UnidentifiedImageError

    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    label_list, text = model.label_embeddings(labels, prompt_template)
    k = min(top_k, len(label_list))
    results, errors = [], []
    for start in range(0, len(paths), batch_size):
        batch_paths, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(_open_rgb(path))
                batch_paths.append(path)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                log.warning("skipping unreadable image %s: %s", path, exc)
                errors.append({"image": str(path), "error": str(exc)})
        if not images:
            continue
        logits = model.similarity(model.image_embeddings(images, batch_size=batch_size), text)
        scores = softmax(logits)
        for path, row in zip(batch_paths, scores):
            order = np.argsort(-row, kind="stable")[:k]
            results.append(
                {
                    "image": str(path),
                    "top_k": [{"label": label_list[i], "score": round(float(row[i]), 6)} for i in order],
                }
            )
    return {
        "files": {part: str(model.files[part]) for part in model.providers_used},
        "execution_providers": dict(model.providers_used),
        "labels": len(label_list),
        "results": results,
        "errors": errors,
    }


def run_infer(
    model_dir: str | Path,
    inputs: Sequence[str | Path],
    *,
    labels_file: str | Path | None = None,
    prompt_template: str | None = None,
    top_k: int = 5,
    provider: str = "cpu",
    precision: str = "auto",
    batch_size: int = 32,
    threads: int | None = None,
) -> dict[str, Any]:
    labels = read_labels(labels_file) if labels_file else None
    paths = collect_images(inputs)  # fail on a bad path before loading any model
    model = OnnxClip.from_dir(model_dir, precision=precision, provider=provider, threads=threads)
    if prompt_template is not None and prompt_template != model.prompt_template:
        log.warning(
            "using the prompt template %r, but %s was exported with %r (the one its adapter was trained with); "
            "accuracy usually drops with another prompt",
            prompt_template,
            model_dir,
            model.prompt_template,
        )
    return classify(model, paths, labels, prompt_template=prompt_template, top_k=top_k, batch_size=batch_size)
