"""Shared fixtures: the tiny CLIP checkpoint, digits subsets on disk, and a real Mosquitto broker."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from flora.modeling.tiny import write_tiny_clip

    return write_tiny_clip(tmp_path_factory.mktemp("model") / "tiny-clip")


@pytest.fixture(scope="session")
def digits():
    from flora.data.digits import load_digits_images

    return load_digits_images()


@pytest.fixture(scope="session")
def digits_split(digits):
    from flora.data.partition import train_test_split

    return train_test_split(digits.labels, 0.2, seed=0)


@pytest.fixture(scope="session")
def test_folder(tmp_path_factory, digits, digits_split):
    from flora.data.datasets import write_image_folder

    _, test_idx = digits_split
    return write_image_folder(digits.subset(test_idx), tmp_path_factory.mktemp("data") / "test")


@pytest.fixture
def mosquitto():
    """A real Mosquitto 2 on a free loopback port with its own config file."""
    if shutil.which("mosquitto") is None and not os.path.exists("/usr/sbin/mosquitto"):
        pytest.fail("mosquitto is not installed: run .ci/run or `apt-get install mosquitto`")
    from tests.brokers import mosquitto_broker

    with mosquitto_broker() as broker:
        yield broker
