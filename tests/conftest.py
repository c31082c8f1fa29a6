"""Shared fixtures (the tiny CLIP checkpoint, digits subsets on disk, a real Mosquitto broker) and test selection.

Selection: `pytest -q` runs the fast tests; `pytest -q --all` (what CI and the README run) adds the
integration tests (everything under tests/integration/, marked automatically) and the slow ones
(@pytest.mark.slow). An explicit `-m EXPR` is used as given.
"""

from __future__ import annotations

import os
import shutil

import pytest

EXTENDED_MARKERS = ("integration", "slow")  # left out of the default run


def pytest_addoption(parser):
    parser.addoption(
        "--all", action="store_true", help="also run the integration and slow tests (CI and the README run this)"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
    if config.getoption("--all") or config.getoption("markexpr"):
        return
    keep, skipped = [], []
    for item in items:
        (skipped if any(item.get_closest_marker(m) for m in EXTENDED_MARKERS) else keep).append(item)
    if skipped:
        config.hook.pytest_deselected(items=skipped)
        items[:] = keep


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
