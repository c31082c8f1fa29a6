"""Algorithms by name, the client hooks an instruction names, and strategies in client selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.registry import Registry, checked_selection
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.algorithms import (
    Candidate,
    CentralDP,
    ClientHook,
    FedAvg,
    FedProx,
    FreezeLoraA,
    ProximalTerm,
    Strategy,
    client_hooks_from_instruction,
    make_strategy,
    register_client_hook,
    register_strategy,
    strategy_class,
    strategy_names,
)
from flora.errors import ConfigError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe


class MostExamples(FedAvg):
    """Selects the `count` candidates that announced the largest datasets."""

    def __init__(self, count: int = 1):
        super().__init__()
        self.count = count

    def select(self, candidates, *, round_, rng_seed, default):
        ranked = sorted(candidates, key=lambda c: (-c.capabilities.get("dataset_size", 0), c.node))
        return [c.node for c in ranked[: self.count]]


def test_proximal_term_loss_and_gradient_match_a_hand_computed_case():
    import torch

    params = {"a": torch.tensor([1.0, 2.0], requires_grad=True), "b": torch.tensor([[3.0]], requires_grad=True)}
    start = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([[1.0]])}
    term = ProximalTerm(mu=0.5).loss_term(params, start)
    # (0.5 / 2) * (1^2 + 1^2 + 2^2) = 1.5 ; gradient mu (w - w_start) = [0.5, 0.5] and [[1.0]]
    assert float(term.detach()) == pytest.approx(1.5)
    term.backward()
    np.testing.assert_allclose(params["a"].grad.numpy(), [0.5, 0.5])
    np.testing.assert_allclose(params["b"].grad.numpy(), [[1.0]])
    assert ProximalTerm(mu=0.0).loss_term(params, start) is None


@pytest.mark.parametrize("mu", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_a_bad_mu_from_the_network_is_refused_with_the_reason(mu):
    with pytest.raises(ValueError, match="fedprox mu must be a finite number >= 0"):
        client_hooks_from_instruction([{"name": "fedprox", "params": {"mu": mu}}])


@pytest.mark.parametrize(
    ("specs", "reason"),
    [
        ([{"name": "no_such_hook"}], "unknown client hook 'no_such_hook'"),
        ([{"name": "fedprx", "params": {"mu": 0.1}}], "did you mean 'fedprox'"),
        ({"name": "fedprox"}, "must be a list"),
        ([{"name": "fedprox"}, {"name": "fedprox"}], "named twice"),
        ([{"name": "fedprox", "params": {"nu": 1}}], r"takes parameters \['mu'\]"),
        ([{"name": "fedprox", "params": [0.1]}], "params must be an object"),
        ([{"name": "fedprox", "extra": 1}], "unknown keys"),
        (["fedprox"], "string 'name'"),
        ([{"name": "ffa_lora"}] * 17, "at most 16"),
    ],
)
def test_malformed_client_hooks_are_refused_with_the_reason(specs, reason):
    with pytest.raises(ValueError, match=reason):
        client_hooks_from_instruction(specs)


def test_strategies_send_their_client_halves_and_clients_read_old_keys_too():
    settings = TrainSettings.from_instruction(FedProx(mu=0.2).configure_train(1, {"learning_rate": 0.1}))
    assert [(type(h), h.mu) for h in settings.client_hooks] == [(ProximalTerm, 0.2)]
    # A coordinator of protocol 1.0 before client_hooks sent these keys instead.
    legacy = TrainSettings.from_instruction({"proximal_mu": 0.3, "freeze_lora_a": True})
    assert [type(h) for h in legacy.client_hooks] == [ProximalTerm, FreezeLoraA] and legacy.client_hooks[0].mu == 0.3
    assert TrainSettings.from_instruction({"proximal_mu": 0.0}).client_hooks == ()
    with pytest.raises(ValueError, match="fedprox mu"):
        TrainSettings.from_instruction({"proximal_mu": -1.0})
    with pytest.raises(ValueError, match="must be a JSON object"):
        TrainSettings.from_instruction(["not", "a", "dict"])


def test_ffa_lora_hook_keeps_a_bit_identical_and_sends_only_b(tiny_model_dir, digits):
    trainer = LocalTrainer(
        load_clip(tiny_model_dir), get_recipe("both-towers"), digits.subset(range(64)), progress=False
    )
    start = {k: v.clone() for k, v in trainer.adapter_state().items()}
    settings = TrainSettings.from_instruction(
        {"learning_rate": 5e-2, "batch_size": 32, "client_hooks": [{"name": "ffa_lora", "params": {}}]}
    )
    sent, _ = trainer.train_round(start, settings, round_=1)
    after = trainer.adapter_state()
    a_names = [k for k in start if ".lora_A." in k]
    assert a_names and sorted(sent) == sorted(k for k in start if ".lora_B." in k)
    assert all(after[k].equal(start[k]) for k in a_names)  # bit-identical, not merely close
    assert any(not sent[k].equal(start[k]) for k in sent)  # B did train


def test_a_user_hook_sees_the_trainable_parameters_and_the_update(tiny_model_dir, digits):
    seen = {}

    class TextOnly(ClientHook):
        """Trains only the text tower's LoRA, and records what the trainer handed over."""

        adds_loss_term = True

        def trains(self, parameter_name):
            return "text_model" in parameter_name

        def loss_term(self, params, start):
            seen["trainable"] = sorted(params)
            seen["same_names"] = sorted(start) == sorted(params)
            return None

        def process_update(self, update, global_adapter):
            seen["global"] = sorted(global_adapter)
            return update

        def metrics(self):
            return {"text_only": 1.0}

    register_client_hook("test_text_only", TextOnly)
    trainer = LocalTrainer(
        load_clip(tiny_model_dir), get_recipe("both-towers"), digits.subset(range(64)), progress=False
    )
    start = {k: v.clone() for k, v in trainer.adapter_state().items()}
    settings = TrainSettings.from_instruction(
        {"learning_rate": 5e-2, "batch_size": 64, "client_hooks": [{"name": "test_text_only"}]}
    )
    sent, metrics = trainer.train_round(start, settings, round_=1)
    assert seen["trainable"] and all("text_model" in n for n in seen["trainable"]) and seen["same_names"]
    assert seen["global"] == sorted(start) and metrics["text_only"] == 1.0
    vision = [k for k in start if "vision_model" in k]
    assert vision and all(sent[k].equal(start[k]) for k in vision)


def test_a_registered_strategy_is_valid_in_the_config_by_name():
    register_strategy("test_most_examples", MostExamples)
    assert "test_most_examples" in strategy_names()
    config = CoordinatorConfig(model="m", strategy="test_most_examples", strategy_params={"count": 2})
    built = make_strategy(config.strategy, config.strategy_params)
    assert isinstance(built, MostExamples) and built.count == 2 and built.name == "test_most_examples"
    with pytest.raises(ConfigError, match=r"did you mean 'test_most_examples'"):
        CoordinatorConfig(model="m", strategy="test_most_exampels")
    with pytest.raises(ConfigError, match=r"takes parameters \['count'\]"):
        CoordinatorConfig(model="m", strategy="test_most_examples", strategy_params={"top": 2})
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("test_most_examples", FedAvg)
    with pytest.raises(TypeError, match="is not a Strategy"):
        register_strategy("test_not_a_strategy", dict)

    @register_strategy("test_decorated")
    class Decorated(FedAvg):
        pass

    assert strategy_class("test_decorated") is Decorated and Decorated.name == "test_decorated"
    assert FedAvg.name == "fedavg"  # registering a subclass did not rename its parent


def test_an_installed_plugin_is_found_by_its_entry_point(tmp_path, monkeypatch):
    (tmp_path / "flora_test_plugin.py").write_text(
        "from flora.algorithms import FedAvg\n\nclass PluginStrategy(FedAvg):\n    pass\n"
    )
    dist = tmp_path / "flora_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: flora-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flora.strategies]\ntest_plugin = flora_test_plugin:PluginStrategy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "test_plugin" in strategy_names()
    strategy = make_strategy("test_plugin", {"clip_norm": 1.0})
    assert type(strategy.inner).__name__ == "PluginStrategy"
    assert strategy.describe()["class"] == "flora_test_plugin:PluginStrategy"


def test_describe_records_name_params_wrappers_hooks_and_class():
    described = make_strategy("fedprox", {"mu": 0.1, "clip_norm": 2.0, "noise_multiplier": 0.5}).describe()
    assert described == {
        "name": "fedprox",
        "class": "flora.algorithms.fedprox:FedProx",
        "params": {"mu": 0.1},
        "wrappers": [
            {
                "name": "dp",
                "class": "flora.algorithms.dp:CentralDP",
                "params": {"clip_norm": 2.0, "noise_multiplier": 0.5, "seed": 0},
            }
        ],
        "client_hooks": [{"name": "fedprox", "params": {"mu": 0.1}}],
    }
    assert make_strategy("fedavgm", {"momentum": 0.5}).describe()["params"] == {"server_lr": 1.0, "momentum": 0.5}


def test_central_dp_installs_its_noise_through_the_mean_transform():
    inner = FedAvg()
    CentralDP(inner, clip_norm=1.0, noise_multiplier=0.0)
    inner.add_mean_transform(lambda mean, count: {k: v + count for k, v in mean.items()})
    inner.begin(1, {"w": np.zeros(2, np.float32)})
    from flora.algorithms import ClientUpdate

    inner.accumulate(ClientUpdate("c", 1, {"w": np.array([1.0, 3.0])}, 1))
    np.testing.assert_allclose(inner.aggregate()["w"], [2.0, 4.0])  # zero noise, then + 1 update


def registry_with_sizes(sizes: dict[str, int]) -> Registry:
    registry = Registry()
    for node, size in sizes.items():
        registry.update(node, {"state": "online", "recipe": "paper", "capabilities": {"dataset_size": size}})
    registry.update("offline-giant", {"state": "offline", "capabilities": {"dataset_size": 10**6}})
    return registry


def test_a_strategy_selects_among_the_eligible_candidates():
    registry = registry_with_sizes({"a": 10, "b": 500, "c": 40, "d": 300})
    candidates = registry.candidates("paper")
    assert [c.node for c in candidates] == ["a", "b", "c", "d"]  # the offline node is not a candidate
    assert candidates[1] == Candidate("b", {"dataset_size": 500})
    default = registry.sample(candidates, fraction=0.5, minimum=1, seed=3)
    assert default == registry.select(fraction=0.5, minimum=1, seed=3, recipe="paper")
    assert Strategy.select(FedAvg(), candidates, round_=1, rng_seed=3, default=default) == default
    chosen = MostExamples(count=2).select(candidates, round_=1, rng_seed=3, default=default)
    assert checked_selection(chosen, candidates, "mine") == ["b", "d"]
    with pytest.raises(ValueError, match=r"selected \['offline-giant'\], which are not eligible"):
        checked_selection(["offline-giant"], candidates, "mine")
    with pytest.raises(TypeError, match="list of node ids"):
        checked_selection("b", candidates, "mine")


def test_wrappers_keep_the_inner_strategy_selection():
    candidates = [Candidate("a", {"dataset_size": 1}), Candidate("b", {"dataset_size": 9})]
    wrapped = CentralDP(MostExamples(), clip_norm=1.0, noise_multiplier=math.pi)
    assert wrapped.select(candidates, round_=1, rng_seed=0, default=["a"]) == ["b"]
