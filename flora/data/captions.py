"""Image-text pairs from a CSV or JSONL file: one row per image, with its path and its caption.

CSV needs a header row; JSONL one JSON object per line. The image column may be called `image`,
`image_path`, `path`, `file` or `filename`; the caption column `caption` or `text`. Relative image
paths are relative to the file's folder. Rows whose image is missing or corrupt are skipped and
counted. Each distinct caption is one text: images that share a caption are positives of the same
text in CLIP's contrastive loss.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from flora.data.datasets import LabeledImages
from flora.data.images import SkippedImages, read_rgb
from flora.errors import DataError

IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename")
CAPTION_COLUMNS = ("caption", "text")


def _pick(columns: list[str], wanted: tuple[str, ...], what: str, source: Path) -> str:
    for name in wanted:
        if name in columns:
            return name
    raise DataError(
        f"{source} has no {what} column: expected one of {', '.join(wanted)}, found {', '.join(columns) or 'none'}"
    )


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise DataError(f"{path} is empty; expected a header row such as 'image,caption' and one row per image")
        yield from enumerate(reader, start=2)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line} is not valid JSON ({exc.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f'{path}:{line} is not a JSON object; expected {{"image": ..., "caption": ...}}')
            yield line, row


def load_captions(path: str | Path, data_format: str) -> LabeledImages:
    """Load image-caption pairs from `path`, a 'csv' or 'jsonl' file."""
    path = Path(path)
    if data_format not in ("csv", "jsonl"):
        raise ValueError(f"data_format must be 'csv' or 'jsonl', got {data_format!r}")
    if not path.is_file():
        raise DataError(
            f"caption file {path} does not exist; with data_format = {data_format!r}, data_dir is the "
            f"{data_format.upper()} file of image paths and captions"
        )
    rows = _csv_rows(path) if data_format == "csv" else _jsonl_rows(path)
    images, captions = [], []
    skipped = SkippedImages()
    image_key = caption_key = None
    for line, row in rows:
        if image_key is None:
            columns = [str(c) for c in row]
            image_key = _pick(columns, IMAGE_COLUMNS, "image path", path)
            caption_key = _pick(columns, CAPTION_COLUMNS, "caption", path)
        image_ref, caption = row.get(image_key), row.get(caption_key)
        if not (isinstance(image_ref, str) and image_ref.strip() and isinstance(caption, str) and caption.strip()):
            skipped.add(f"{path}:{line}", f"needs a non-empty {image_key!r} and {caption_key!r}")
            continue
        file = Path(image_ref.strip())
        if not file.is_absolute():
            file = path.parent / file
        image = read_rgb(file, str(file), skipped)
        if image is not None:
            images.append(image)
            captions.append(caption.strip())
    if image_key is None:
        raise DataError(f"{path} has no rows; expected one row per image with its path and caption")
    if not images:
        raise DataError(f"no readable images listed in {path} ({len(skipped)} rows skipped); check the paths")
    texts = sorted(set(captions))
    index = {text: i for i, text in enumerate(texts)}
    labels = np.asarray([index[c] for c in captions], dtype=np.int64)
    return LabeledImages(images, labels, texts, len(skipped), skipped.names, text_kind="caption")
