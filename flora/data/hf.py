"""A Hugging Face `datasets` dataset saved to disk (`Dataset.save_to_disk`), loaded with `load_from_disk`.

Columns are found by their features: the image column is the one of type `Image`; the text is
a `ClassLabel` column (its names fill the prompt template, in the feature's order, so every device
numbers classes alike), or else a string column named `caption`/`text` (image-caption pairs) or
`label`/`class`/`category` (class names). A `DatasetDict` uses its `train` split. Images are decoded
here, one by one, so a corrupt one is skipped and counted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flora.data.captions import CAPTION_COLUMNS
from flora.data.datasets import LabeledImages
from flora.data.images import SkippedImages, read_rgb
from flora.errors import ConfigError, DataError

CLASS_COLUMNS = ("label", "labels", "class", "category")


def _open(path: Path):
    try:
        import datasets
    except ImportError:
        raise ConfigError("data_format = 'hf-dataset' needs the `datasets` package: pip install datasets") from None
    if not path.is_dir():
        raise DataError(f"dataset directory {path} does not exist; save one with Dataset.save_to_disk({str(path)!r})")
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path} is not a dataset saved with save_to_disk: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path} holds splits {', '.join(ds)} but no 'train' split to train on")
        ds = ds["train"]
    return datasets, ds


def load_hf_dataset(path: str | Path) -> LabeledImages:
    path = Path(path)
    datasets, ds = _open(path)
    features = ds.features
    image_cols = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    if len(image_cols) != 1:
        raise DataError(
            f"{path}: expected exactly one column of type Image, found {image_cols or 'none'} "
            f"(columns: {', '.join(f'{n}: {type(f).__name__}' for n, f in features.items())})"
        )
    image_col = image_cols[0]
    class_cols = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
    strings = [
        name for name, f in features.items() if isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")
    ]
    caption_cols = [c for c in CAPTION_COLUMNS if c in strings]
    string_class_cols = [c for c in CLASS_COLUMNS if c in strings]
    if class_cols:
        text_col, kind = class_cols[0], "classlabel"
    elif caption_cols:
        text_col, kind = caption_cols[0], "caption"
    elif string_class_cols:
        text_col, kind = string_class_cols[0], "class"
    else:
        raise DataError(
            f"{path}: no text column: expected a ClassLabel column, or a string column named one of "
            f"{', '.join(CAPTION_COLUMNS + CLASS_COLUMNS)} (columns: {', '.join(features)})"
        )
    if len(ds) == 0:
        raise DataError(f"{path} has no rows")
    rows = ds.select_columns([image_col, text_col]).cast_column(image_col, datasets.Image(decode=False))
    images, texts = [], []
    skipped = SkippedImages()
    for i, row in enumerate(rows):
        ref = row[image_col] or {}
        name = f"{path}[{i}]" + (f" ({ref['path']})" if ref.get("path") else "")
        source = ref.get("bytes") or ref.get("path")
        text = row[text_col]
        if source is None or text is None or (isinstance(text, str) and not text.strip()):
            skipped.add(name, "no image or no text")
            continue
        image = read_rgb(source, name, skipped)
        if image is not None:
            images.append(image)
            texts.append(text)
    if not images:
        raise DataError(f"no readable images in {path} ({len(skipped)} skipped)")
    if kind == "classlabel":
        names = list(features[text_col].names)
        return LabeledImages(images, np.asarray(texts, dtype=np.int64), names, len(skipped), skipped.names)
    distinct = sorted({t.strip() for t in texts})
    index = {t: i for i, t in enumerate(distinct)}
    labels = np.asarray([index[t.strip()] for t in texts], dtype=np.int64)
    return LabeledImages(
        images, labels, distinct, len(skipped), skipped.names, text_kind="caption" if kind == "caption" else "class"
    )
