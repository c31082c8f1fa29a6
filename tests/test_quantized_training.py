"""Training on a bitsandbytes 4-bit / 8-bit base, the real quantization probe, and the fallback without it."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from edge_client import capabilities
from edge_client.config import ClientConfig
from edge_client.quantization import load_for_training
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.errors import ConfigError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

SETTINGS = TrainSettings(
    local_epochs=2, learning_rate=5e-3, batch_size=32, prompt_template="a photo of the digit {label}."
)


def bnb_layers(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__module__.startswith("bitsandbytes")}


@pytest.mark.parametrize(
    ("quantization", "recipe", "layer"),
    [("4bit", "paper", "Linear4bit"), ("8bit", "both-towers", "Linear8bitLt")],
)
def test_training_on_a_quantized_base_lowers_the_loss(tiny_model_dir, digits, tmp_path, quantization, recipe, layer):
    clip = load_clip(tiny_model_dir, quantization=quantization)
    assert layer in bnb_layers(clip.model)  # real bitsandbytes layers, not a stand-in
    trainer = LocalTrainer(clip, get_recipe(recipe), digits.subset(range(160)), progress=False, cache_dir=tmp_path)
    # peft's kbit preparation: the base is frozen, and its non-quantized floating parameters are fp32.
    base = {n: p for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert not any(p.requires_grad for p in base.values())
    assert {p.dtype for p in base.values() if p.is_floating_point()} == {__import__("torch").float32}
    everything = np.arange(trainer.num_examples)
    loss_before, _ = trainer.batch_gradients(everything, SETTINGS.prompt_template)
    start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
    first, m1 = trainer.train_round(start, SETTINGS, round_=1)
    loss_after_one, _ = trainer.batch_gradients(everything, SETTINGS.prompt_template)
    second, _ = trainer.train_round(first, SETTINGS, round_=2)
    loss_after_two, _ = trainer.batch_gradients(everything, SETTINGS.prompt_template)
    assert loss_after_two < loss_after_one < loss_before  # the contrastive loss over all the local data
    assert all("lora_" in name for name in second) and set(second) == set(start)
    assert any(not np.allclose(first[k].numpy(), start[k]) for k in start)
    assert m1["image_embeddings_cached"] == int(recipe == "paper")


def test_the_probe_runs_a_quantized_layer_and_reports_a_kernel_failure(monkeypatch):
    capabilities.quantization_problem.cache_clear()
    try:
        assert capabilities.quantization_problem("4bit", "cpu") is None
        assert capabilities.quantization_problem("8bit", "cpu") is None
        caps = capabilities.detect_capabilities("cpu", 10, "4bit", configured_quantization="4bit")
        assert caps["supports_4bit"] and caps["supports_8bit"] and caps["quantization"] == "4bit"
        capabilities.quantization_problem.cache_clear()
        import bitsandbytes as bnb

        def no_kernel(self, x):  # what a wheel without sm_87 kernels does on an Orin
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

        monkeypatch.setattr(bnb.nn.Linear4bit, "forward", no_kernel)
        problem = capabilities.quantization_problem("4bit", "cpu")
        assert "failed to run a 4bit layer on cpu" in problem and "no kernel image" in problem
        assert capabilities.quantization_problem("8bit", "cpu") is None
        caps = capabilities.detect_capabilities("cpu", 10, "none", configured_quantization="4bit")
        assert not caps["supports_4bit"] and caps["quantization"] == "none"
        assert caps["quantization_configured"] == "4bit"
    finally:
        capabilities.quantization_problem.cache_clear()


def config(tiny_model_dir, tmp_path, **kwargs):
    return ClientConfig(
        node_id="n", model=str(tiny_model_dir), data_dir=tmp_path, device="cpu", state_dir=tmp_path, **kwargs
    )


def test_falls_back_to_an_unquantized_base_with_a_warning(tiny_model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(capabilities, "quantization_problem", lambda kind, device: "simulated: no sm_87 kernels")
    with caplog.at_level(logging.WARNING, logger="edge_client.quantization"):
        clip = load_for_training(config(tiny_model_dir, tmp_path, quantization="4bit"))
    assert clip.quantization == "none" and not bnb_layers(clip.model)
    assert "quantization = '4bit' is not available on cpu: simulated: no sm_87 kernels" in caplog.text
    assert "Falling back to an unquantized float32 base" in caplog.text


def test_without_fallback_refuses_to_start_and_says_what_to_change(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(capabilities, "quantization_problem", lambda kind, device: "simulated: no sm_87 kernels")
    with pytest.raises(ConfigError, match=r"simulated: no sm_87 kernels\. Set quantization = 'none'.*fallback = true"):
        load_for_training(config(tiny_model_dir, tmp_path, quantization="8bit", quantization_fallback=False))


def test_a_quantized_load_that_fails_falls_back_too(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import edge_client.quantization as quantization

    real_load = quantization.load_clip

    def load(name, *, quantization, **kwargs):
        if quantization != "none":
            raise RuntimeError("Error named symbol not found at line 90 in file /src/csrc/ops.cu")
        return real_load(name, quantization=quantization, **kwargs)

    monkeypatch.setattr(quantization, "load_clip", load)
    with caplog.at_level(logging.WARNING, logger="edge_client.quantization"):
        clip = load_for_training(config(tiny_model_dir, tmp_path, quantization="4bit"))
    assert clip.quantization == "none" and "named symbol not found" in caplog.text


def test_the_configured_quantization_is_used_when_it_runs(tiny_model_dir, tmp_path):
    clip = load_for_training(config(tiny_model_dir, tmp_path, quantization="4bit"))
    assert clip.quantization == "4bit" and "Linear4bit" in bnb_layers(clip.model)


def test_a_round_under_bfloat16_autocast(tiny_model_dir, digits):
    import torch

    trainer = LocalTrainer(
        load_clip(tiny_model_dir),
        get_recipe("both-towers"),
        digits.subset(range(64)),
        progress=False,
        autocast="bfloat16",
    )
    assert trainer.autocast_dtype == torch.bfloat16
    idx = np.arange(64)
    loss, grads = trainer.batch_gradients(idx, SETTINGS.prompt_template)
    loss_micro, _ = trainer.batch_gradients(idx, SETTINGS.prompt_template, micro=16)
    assert np.isfinite(loss) and loss_micro == pytest.approx(loss, rel=2e-2)  # bf16 matmuls, fp32 loss
    assert all(g.dtype == torch.float32 for g in grads.values())  # the adapter trains in fp32
    start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
    tensors, metrics = trainer.train_round(start, SETTINGS, round_=1)
    assert np.isfinite(metrics["train_loss"]) and all(t.dtype == torch.float32 for t in tensors.values())
    with pytest.raises(ConfigError, match="autocast must be one of auto, off, float16, bfloat16"):
        LocalTrainer(load_clip(tiny_model_dir), get_recipe("paper"), digits.subset(range(8)), autocast="fp8")
