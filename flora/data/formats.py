"""The local data formats an edge client can train on, and one entry point that loads any of them."""

from __future__ import annotations

from pathlib import Path

from flora.data.datasets import LabeledImages

DATA_FORMATS = ("image-folder", "csv", "jsonl", "hf-dataset")
DATA_FORMAT_HELP = (
    "image-folder: data_dir has one subfolder per class (the folder name fills the prompt template); "
    "csv / jsonl: data_dir is a file of image path + caption rows (image-text pairs); "
    "hf-dataset: data_dir is a Hugging Face dataset saved with save_to_disk"
)


def load_local_data(path: str | Path, data_format: str = "image-folder") -> LabeledImages:
    """Load `path` in `data_format`. Corrupt images are skipped and counted; no usable data is a DataError."""
    if data_format == "image-folder":
        from flora.data.datasets import load_image_folder

        return load_image_folder(path)
    if data_format in ("csv", "jsonl"):
        from flora.data.captions import load_captions

        return load_captions(path, data_format)
    if data_format == "hf-dataset":
        from flora.data.hf import load_hf_dataset

        return load_hf_dataset(path)
    raise ValueError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
