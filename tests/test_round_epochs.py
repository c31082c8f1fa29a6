"""Fractions of an epoch per round (protocol 1.3, `train.round_epochs`): the batch stream, the field's rules, a round."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.objective import local_work_settings
from edge_client.schedule import round_batches
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.protocol.schema import check_data
from tests.integration.helpers import TEMPLATE


def seen(batches) -> Counter:
    return Counter(int(i) for batch in batches for i in batch)


def test_whole_epochs_keep_the_order_of_earlier_releases():
    # One permutation per epoch from a generator seeded by (seed, round): the order before fractions existed, so
    # a run with whole epochs trains exactly as it did.
    rng = np.random.default_rng([3, 5])
    expected = [order[s : s + 8] for order in (rng.permutation(20), rng.permutation(20)) for s in range(0, 20, 8)]
    got = round_batches(20, 8, 2, seed=3, round_=5)
    assert len(got) == len(expected) == 6
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    assert seen(got) == Counter({i: 2 for i in range(20)})


def test_a_quarter_epoch_a_round_sees_every_example_once_in_four_rounds():
    # 100 examples at batch 8: 13 batches an epoch, 3.25 a round, so rounds take 3, 3, 3 and 4 batches.
    rounds = [round_batches(100, 8, 0.25, seed=1, round_=r) for r in range(1, 9)]
    assert [len(b) for b in rounds] == [3, 3, 3, 4, 3, 3, 3, 4]
    assert seen(sum(rounds[:4], [])) == Counter(range(100))  # epoch 1 of the stream: each example exactly once
    assert seen(sum(rounds[4:], [])) == Counter(range(100))
    first_epoch = np.concatenate(sum(rounds[:4], []))
    second_epoch = np.concatenate(sum(rounds[4:], []))
    assert not np.array_equal(first_epoch, second_epoch)  # a fresh permutation each epoch of the stream


def test_the_total_is_exact_whatever_the_fraction():
    # 0.1 x 30 batches is 3 in exact arithmetic (binary floating point makes it 3.0000000000000004).
    assert [len(round_batches(240, 8, 0.1, seed=0, round_=r)) for r in range(1, 11)] == [3] * 10
    # 1.5 epochs a round: 3 rounds are 4.5 epochs of 7 batches, 31 batches (floor of 31.5), no batch lost or added.
    assert sum(len(round_batches(50, 8, 1.5, seed=0, round_=r)) for r in range(1, 4)) == 31


def test_a_round_depends_only_on_its_number():
    # A device restarted between rounds trains round 7 exactly as if it had never stopped.
    a = round_batches(90, 16, 0.3, seed=4, round_=7)
    b = round_batches(90, 16, 0.3, seed=4, round_=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_seed = round_batches(90, 16, 0.3, seed=5, round_=7)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_seed))


def test_a_device_with_less_than_a_batch_a_round_still_trains_one():
    assert [len(round_batches(5, 8, 0.1, seed=0, round_=r)) for r in range(1, 5)] == [1, 1, 1, 1]


@pytest.mark.parametrize("bad", [(0, 8, 0.5), (10, 0, 0.5), (10, 8, 0), (10, 8, -1.0), (10, 8, float("nan"))])
def test_an_impossible_round_is_refused(bad):
    n, batch, epochs = bad
    with pytest.raises(ValueError, match="cannot plan"):
        round_batches(n, batch, epochs, seed=0, round_=1)


def test_the_coordinator_sends_a_fraction_beside_its_whole_number_stand_in():
    assert local_work_settings(2) == {"local_epochs": 2}
    assert local_work_settings(2.0) == {"local_epochs": 2}  # TOML `2.0` or a float config: still whole epochs
    assert local_work_settings(0.25) == {"local_epochs": 1, "round_epochs": 0.25}
    assert local_work_settings(1.5) == {"local_epochs": 2, "round_epochs": 1.5}
    with pytest.raises(ConfigError, match="> 0"):
        local_work_settings(0)
    with pytest.raises(ConfigError, match="local_epochs"):
        CoordinatorConfig(model="m", local_epochs=-0.5)


def test_the_client_reads_round_epochs_over_local_epochs_and_bounds_it():
    assert TrainSettings.from_instruction({"local_epochs": 1, "round_epochs": 0.25}).local_epochs == 0.25
    assert TrainSettings.from_instruction({"local_epochs": 3}).local_epochs == 3  # a 1.2 coordinator: as before
    for bad in (0, -0.5, 1001, "half", True, float("inf")):
        with pytest.raises(ValueError, match="round_epochs"):
            TrainSettings.from_instruction({"local_epochs": 1, "round_epochs": bad})
        with pytest.raises(ProtocolError) as info:
            check_data("train", {"selected": ["a"], "train": {"round_epochs": bad}})
        assert info.value.reason is RejectReason.MALFORMED and "round_epochs" in info.value.detail


def test_a_fractional_round_trains_its_slice_of_the_data(tiny_model_dir, digits):
    data = digits.subset(range(64))  # 8 batches of 8 an epoch: half an epoch is 4 steps
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("paper"), data, progress=False)
    start = trainer.adapter_state()
    settings = TrainSettings(local_epochs=0.5, learning_rate=1e-3, batch_size=8, prompt_template=TEMPLATE)
    tensors, metrics = trainer.train_round(start, settings, round_=1)
    assert metrics["steps"] == 4
    assert any(not np.array_equal(np.asarray(tensors[k]), np.asarray(start[k])) for k in start)
    _, metrics = trainer.train_round(start, TrainSettings(batch_size=8, prompt_template=TEMPLATE), round_=1)
    assert metrics["steps"] == 8  # one whole epoch, as before
