import numpy as np
import pytest

from edge_client.trainer import LocalTrainer, TrainSettings
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

SETTINGS = TrainSettings(
    local_epochs=2, learning_rate=5e-3, batch_size=32, prompt_template="a photo of the digit {label}."
)


def test_a_round_of_local_training_lowers_the_loss_and_returns_only_adapter_tensors(tiny_model_dir, digits):
    trainer = LocalTrainer(
        load_clip(tiny_model_dir), get_recipe("both-towers"), digits.subset(range(200)), progress=False
    )
    start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
    first, m1 = trainer.train_round(start, SETTINGS, round_=1)
    _, m2 = trainer.train_round(first, SETTINGS, round_=2)
    assert set(first) == set(start)  # only LoRA tensors leave the device
    assert all("lora_" in name for name in first)
    assert m2["train_loss"] < m1["train_loss"]
    assert any(not np.allclose(first[k].numpy(), start[k]) for k in start)
    assert m1["num_examples"] == 200 and m1["steps"] == 2 * 7 and m1["peak_memory_mb"] > 0


def test_train_settings_from_instruction_validate():
    assert TrainSettings.from_instruction({"learning_rate": 0.1, "betas": [0.8, 0.9], "unknown": 1}).betas == (0.8, 0.9)
    with pytest.raises(ValueError):
        TrainSettings.from_instruction({"learning_rate": -1})
