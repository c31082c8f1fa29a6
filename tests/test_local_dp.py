"""Local differential privacy on the update: the change is clipped to a norm and Gaussian noise is added."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_client.config import ClientConfig
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.algorithms import LocalDP, client_hooks_from_instruction
from flora.errors import ConfigError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe


def tensors(seed: int, scale: float = 1.0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(8, 64, generator=g) * scale, "a.lora_B": torch.randn(64, 8, generator=g) * scale}


def norm(d) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in d.values()))


def test_clipping_scales_a_large_change_down_to_the_norm_and_keeps_a_small_one():
    reference, local = tensors(0), tensors(1)
    delta = {k: local[k] - reference[k] for k in local}
    clipped = LocalDP(clip_norm=1.0).apply(local, reference)
    change = {k: clipped[k] - reference[k] for k in local}
    assert norm(delta) > 10 and norm(change) == pytest.approx(1.0, rel=1e-6)
    for k in local:  # same direction, only shorter
        np.testing.assert_allclose(change[k].numpy(), (delta[k] / norm(delta)).numpy(), rtol=1e-4, atol=1e-7)
    small = {k: reference[k] + 1e-3 * delta[k] / norm(delta) for k in local}
    kept = LocalDP(clip_norm=1.0).apply(small, reference)
    for k in local:
        np.testing.assert_allclose(kept[k].numpy(), small[k].numpy(), atol=1e-7)


def test_noise_has_std_multiplier_times_clip_norm_and_is_not_reproducible():
    import torch

    reference = tensors(0)
    local = {k: v.clone() for k, v in reference.items()}  # no change: what remains is the noise
    dp = LocalDP(clip_norm=0.5, noise_multiplier=2.0)
    noised = dp.apply(local, reference)
    noise = torch.cat([(noised[k] - reference[k]).flatten() for k in local])
    assert noise.numel() == 1024
    assert float(noise.std()) == pytest.approx(1.0, rel=0.1)  # 2.0 x 0.5; 1024 samples: ~2% standard error
    assert abs(float(noise.mean())) < 0.15
    again = dp.apply(local, reference)  # seeded from the OS, not from the config
    assert not torch.equal(again["a.lora_A"], noised["a.lora_A"])
    assert dp.metrics() == {"dp_clip_norm": 0.5, "dp_noise_multiplier": 2.0}


def test_dp_settings_are_validated_with_a_fix():
    with pytest.raises(ConfigError, match="dp_noise_multiplier needs dp_clip_norm"):
        ClientConfig(node_id="n", model="m", data_dir=".", dp_noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="dp_clip_norm must be a positive number"):
        ClientConfig(node_id="n", model="m", data_dir=".", dp_clip_norm=0.0)
    with pytest.raises(ConfigError, match="dp_noise_multiplier must be >= 0"):
        ClientConfig(node_id="n", model="m", data_dir=".", dp_clip_norm=1.0, dp_noise_multiplier=-1.0)
    assert ClientConfig(node_id="n", model="m", data_dir=".", dp_clip_norm=1.0).dp_noise_multiplier is None


def test_a_round_with_local_dp_sends_a_clipped_noised_change_and_says_so(tiny_model_dir, digits):
    settings = TrainSettings(local_epochs=1, learning_rate=5e-2, batch_size=32, prompt_template="a photo of {label}.")
    data = digits.subset(range(96))
    clip_norm = 1e-3  # far below what a round at this learning rate moves the adapter
    # Local DP is a client hook the device adds itself (edge_client.agent, from dp_clip_norm/dp_noise_multiplier).
    trainer = LocalTrainer(load_clip(tiny_model_dir), get_recipe("both-towers"), data, progress=False)
    start = trainer.adapter_state()  # fp32 tensors, as received from the coordinator
    free, free_metrics = trainer.train_round(start, settings, round_=1)
    assert "dp_clip_norm" not in free_metrics
    free_delta = {k: free[k] - start[k] for k in start}

    sent, metrics = trainer.train_round(start, settings, round_=1, hooks=[LocalDP.from_settings(clip_norm, None)])
    delta = {k: sent[k] - start[k] for k in start}
    assert norm(free_delta) > 100 * clip_norm and norm(delta) == pytest.approx(clip_norm, rel=1e-4)
    assert metrics["dp_clip_norm"] == clip_norm and metrics["dp_noise_multiplier"] == 0.0
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())  # only scalars leave the device

    sent, metrics = trainer.train_round(start, settings, round_=1, hooks=[LocalDP.from_settings(clip_norm, 1.0)])
    count = sum(v.numel() for v in start.values())
    # Noise of std 1e-3 on each of ~20k coordinates dwarfs the clipped change (norm 1e-3).
    assert norm({k: sent[k] - start[k] for k in start}) == pytest.approx(clip_norm * math.sqrt(count), rel=0.1)
    assert metrics["dp_noise_multiplier"] == 1.0


def test_local_dp_named_by_an_instruction_is_validated_like_any_hook():
    (hook,) = client_hooks_from_instruction([{"name": "local_dp", "params": {"clip_norm": 0.5}}])
    assert hook == LocalDP(clip_norm=0.5)
    for bad in ({"clip_norm": -1.0}, {"clip_norm": float("nan")}, {"clip_norm": "1"}, {"clip_norm": 1.0, "x": 1}):
        with pytest.raises(ValueError, match="local_dp"):
            client_hooks_from_instruction([{"name": "local_dp", "params": bad}])
