"""A cell's data: a fixed test split, a validation split carved from training data, and the clients' shares.

The test split is the same for every cell (seed 0), so cells are compared on one set. The validation split is
carved from the training data with the cell's seed: the coordinator evaluates on it every round (what a user
would tune on), and the test split is scored once, after the last round.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flora.app.simulate.experiment import ExperimentConfig, split_kwargs
from flora.data.datasets import LabeledImages, write_image_folder
from flora.data.formats import load_local_data
from flora.data.partition import partition, train_test_split
from flora.errors import ConfigError


@dataclass
class CellData:
    clients: list[LabeledImages]
    validation_dir: Path  # an image folder: what the coordinator's evaluator reads
    test: LabeledImages

    @property
    def train_examples(self) -> int:
        return sum(len(c) for c in self.clients)


_LOADED: dict[str, LabeledImages] = {}


def load_dataset(name: str, data_format: str = "image-folder") -> LabeledImages:
    """'digits' (scikit-learn's, offline) or a path in `data_format`; loaded once per process."""
    if name not in _LOADED:
        if name == "digits":
            from flora.data.digits import load_digits_images

            _LOADED[name] = load_digits_images()
        else:
            _LOADED[name] = load_local_data(name, data_format)
    return _LOADED[name]


def cell_data(exp: ExperimentConfig, split: str, seed: int, work_dir: Path) -> CellData:
    data = load_dataset(exp.dataset, exp.data_format)
    if exp.test_dataset:
        train_idx, test = np.arange(len(data)), load_dataset(exp.test_dataset, exp.data_format)
        if test.class_names != data.class_names:
            raise ConfigError(f"test_dataset {exp.test_dataset} has other classes than {exp.dataset}")
    else:
        train_idx, test_idx = train_test_split(data.labels, exp.test_fraction, seed=0)
        test = data.subset(test_idx)
    if exp.validation_fraction > 0:
        fit, held = train_test_split(data.labels[train_idx], exp.validation_fraction, seed=seed)
        train_idx, val_idx = train_idx[fit], train_idx[held]
    else:
        val_idx = train_idx  # no validation split asked for: per-round accuracy is then on training data
    method, kwargs = split_kwargs(split)
    if method == "centralized":
        parts = [np.arange(len(train_idx))]
    else:
        parts = partition(data.labels[train_idx], exp.clients, method, seed=seed, **kwargs)
    validation_dir = work_dir / f"validation-s{seed}"
    if not validation_dir.is_dir():
        tmp = work_dir / f".validation-s{seed}.tmp"
        write_image_folder(data.subset(val_idx), tmp)
        tmp.rename(validation_dir)  # complete or absent: a crash mid-write never leaves half a folder
    return CellData([data.subset(train_idx[p]) for p in parts], validation_dir, test)
