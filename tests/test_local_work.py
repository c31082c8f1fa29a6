"""A round's local work (protocol 1.3): fractions of an epoch (`train.round_epochs`: the batch stream, the field's
rules, a round), the clients' optimizer (`train.optimizer`), and the coordinator selecting only clients that read
them."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.eligibility import Eligibility
from coordinator.objective import local_work_settings, protocol_needed
from coordinator.registry import NodeInfo, Registry, Requirements
from edge_client.schedule import round_batches
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.protocol.schema import check_data
from tests.integration.helpers import TEMPLATE


def seen(batches) -> Counter:
    return Counter(int(i) for batch in batches for i in batch)


def joined(rounds) -> list:
    return [batch for round_ in rounds for batch in round_]


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
    assert seen(joined(rounds[:4])) == Counter(range(100))  # epoch 1 of the stream: each example exactly once
    assert seen(joined(rounds[4:])) == Counter(range(100))
    first_epoch = np.concatenate(joined(rounds[:4]))
    second_epoch = np.concatenate(joined(rounds[4:]))
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


def test_one_sgd_step_moves_the_adapter_by_the_learning_rate_times_the_gradient(tiny_model_dir, digits):
    import torch

    data = digits.subset(range(16))
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("paper"), data, progress=False)
    _, grads = trainer.batch_gradients(list(range(16)), TEMPLATE)  # the whole local data: one batch
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if n in grads}
    settings = TrainSettings(
        optimizer="sgd", learning_rate=0.5, weight_decay=0.0, batch_size=16, prompt_template=TEMPLATE
    )
    _, metrics = trainer.train_round(trainer.adapter_state(), settings, round_=1)
    assert metrics["steps"] == 1
    after = dict(trainer.model.named_parameters())
    assert any(grad.abs().max() > 0 for grad in grads.values())  # B's (A's is zero while B starts at zero)
    for name, grad in grads.items():
        torch.testing.assert_close(after[name].detach(), before[name] - 0.5 * grad, rtol=1e-5, atol=1e-6)


def test_the_optimizer_field_is_read_and_bounded():
    assert TrainSettings.from_instruction({"optimizer": "sgd"}).optimizer == "sgd"
    assert TrainSettings.from_instruction({}).optimizer == "adamw"  # absent (a coordinator of 1.2): the paper's
    for bad in ("adam", "", 3, ["sgd"]):
        with pytest.raises(ValueError, match="optimizer"):
            TrainSettings.from_instruction({"optimizer": bad})
    assert local_work_settings(1, "sgd") == {"local_epochs": 1, "optimizer": "sgd"}
    with pytest.raises(ConfigError, match="client_optimizer"):
        local_work_settings(1, "lion")
    with pytest.raises(ConfigError, match="client_optimizer"):
        CoordinatorConfig(model="m", client_optimizer="adam")


def test_the_coordinator_uses_only_clients_that_read_the_settings():
    assert protocol_needed(1, "adamw") == (0, "")
    minor, because = protocol_needed(0.25, "sgd")
    assert minor == 3 and "local_epochs = 0.25" in because and "client_optimizer = 'sgd'" in because
    eligibility = Eligibility(
        run_id="r", recipe="paper", rank=2, accepts_lower_rank=False, fingerprint=None, model="m",
        requirements=Requirements(), needs_minor=minor, needs_because=because,
    )  # fmt: skip
    registry = Registry()
    old = registry.update("old", {"state": "online"}, protocol="1.2")
    new = registry.update("new", {"state": "online"}, protocol="1.3")
    bare = registry.update("bare", {"state": "online"}, protocol="1")  # no minor written: not held against it
    reason = eligibility.why_not(old, 1)
    assert old.protocol_minor == 2 and "1.2" in reason and "needs 1.3" in reason and "upgrade" in reason
    assert eligibility.why_not(new, 1) is None and bare.protocol_minor is None and eligibility.why_not(bare, 1) is None
    assert registry.online(why_not=lambda info: eligibility.why_not(info, 1)) == ["bare", "new"]
    plain = Eligibility("r", "paper", 2, False, None, "m", Requirements())
    assert plain.why_not(old, 1) is None  # whole epochs with AdamW: a 1.2 client follows them
    assert NodeInfo("x").protocol_minor is None
