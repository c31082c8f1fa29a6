"""The model-family seam, proven by a second family: SigLIP trains federated, caches, exports and infers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from flora.data.datasets import LabeledImages, load_image_folder, pixel_values, write_image_folder
from flora.errors import ConfigError
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.families import CLIP, SIGLIP, family_for, get_family, write_tiny_siglip
from flora.modeling.loading import load_model
from flora.modeling.recipes import get_recipe
from flora.modeling.scoring import DEFAULT_TEMPLATE
from tests.integration.helpers import client_configs, coordinator_config, start_agents

TEMPLATE = "a photo of the digit {label}."


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return write_tiny_siglip(tmp_path_factory.mktemp("model") / "tiny-siglip")


@pytest.fixture(scope="module")
def small_digits(digits, digits_split) -> LabeledImages:
    train_idx, _ = digits_split
    return digits.subset(train_idx[:60])


def test_the_family_is_detected_from_the_checkpoint(siglip_dir, tiny_model_dir):
    assert family_for(siglip_dir) is SIGLIP and family_for(tiny_model_dir) is CLIP
    loaded = load_model(siglip_dir)
    assert loaded.family is SIGLIP and type(loaded.model).__name__ == "SiglipModel"
    assert family_for(loaded.model) is SIGLIP
    with pytest.raises(ConfigError, match="unknown model family"):
        get_family("blip")
    with pytest.raises(ConfigError, match="belongs to no registered model family"):
        family_for({"model_type": "bert"})


def test_tiny_siglip_tokenizer_loads_back_and_pads_to_the_towers_length(siglip_dir):
    loaded = load_model(siglip_dir)
    inputs = SIGLIP.tokenize(loaded.tokenizer, ["a photo of the digit 7.", "cat"])
    assert set(inputs) == {"input_ids"}  # SigLIP was trained without an attention mask
    assert inputs["input_ids"].shape == (2, loaded.model.config.text_config.max_position_embeddings)
    eos = loaded.tokenizer.eos_token_id
    assert inputs["input_ids"][1, :2].tolist() == [loaded.tokenizer.convert_tokens_to_ids("cat"), eos]


def test_siglip_sigmoid_loss_equals_hand_computed_value_on_2x2():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    loss = SIGLIP.loss(images, texts, torch.tensor([0, 1]), scale, bias)
    # logits = 10 * cos + (-5): [[5, 1], [-5, 3]]; z = +1 on the diagonal, -1 elsewhere.
    logits = [[5.0, 1.0], [-5.0, 3.0]]
    signs = [[1, -1], [-1, 1]]
    expected = -sum(np.log(1 / (1 + np.exp(-s * x))) for row, srow in zip(logits, signs) for x, s in zip(row, srow)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Not CLIP's softmax loss: the same embeddings give another value there.
    assert float(CLIP.loss(images, texts, torch.tensor([0, 1]), scale)) != pytest.approx(expected, rel=1e-3)


def test_siglip_logits_are_the_models_own(siglip_dir, small_digits):
    loaded = load_model(siglip_dir)
    prompts = [TEMPLATE.format(label=c) for c in small_digits.class_names[:3]]
    text_inputs = SIGLIP.tokenize(loaded.tokenizer, prompts)
    pixels = pixel_values(loaded.image_processor, small_digits.images[:4])
    with torch.no_grad():
        ours = SIGLIP.logits(
            SIGLIP.image_embeddings(loaded.model, pixels),
            SIGLIP.text_embeddings(loaded.model, text_inputs),
            SIGLIP.logit_scale(loaded.model),
            SIGLIP.logit_bias(loaded.model),
        )
        theirs = loaded.model(**text_inputs, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_builtin_recipes_target_the_same_layers_in_siglip(siglip_dir):
    model = attach_lora(load_model(siglip_dir).model, get_recipe("paper"))
    names = list(get_adapter_state(model))
    layers = model.base_model.model.config.text_config.num_hidden_layers
    assert len(names) == 2 * layers and all("text_model.encoder" in n and "out_proj" in n for n in names)
    both = attach_lora(load_model(siglip_dir).model, get_recipe("both-towers"))
    assert any(SIGLIP.on_image_path(n) for n in get_adapter_state(both))


def test_siglip_trainer_uses_the_sigmoid_loss_and_caches_image_embeddings(siglip_dir, small_digits, tmp_path):
    from edge_client.trainer import LocalTrainer

    cache = tmp_path / "cache"
    trainer = LocalTrainer(load_model(siglip_dir), get_recipe("paper"), small_digits, cache_dir=cache, progress=False)
    assert not trainer.trains_images and trainer.cache_status == "built"
    indices = np.arange(8)
    loss, grads = trainer.batch_gradients(indices)
    assert grads and all("lora_" in n for n in grads)
    # The same loss by hand: the family's sigmoid loss on the model's own embeddings.
    model = trainer.model
    texts, targets = np.unique(small_digits.labels[indices], return_inverse=True)
    text_inputs = SIGLIP.tokenize(trainer.clip.tokenizer, small_digits.texts(DEFAULT_TEMPLATE))
    with torch.no_grad():
        model.eval()
        text_embeds = SIGLIP.text_embeddings(model, {k: v[torch.as_tensor(texts)] for k, v in text_inputs.items()})
        expected = SIGLIP.loss(
            trainer.image_embeds[torch.as_tensor(indices)],
            text_embeds,
            torch.as_tensor(targets),
            SIGLIP.logit_scale(model),
            SIGLIP.logit_bias(model),
        )
    assert loss == pytest.approx(float(expected), rel=1e-5)
    # A second client start on the same data and model reuses the embeddings from disk.
    again = LocalTrainer(load_model(siglip_dir), get_recipe("paper"), small_digits, cache_dir=cache, progress=False)
    assert again.cache_status == "hit"
    torch.testing.assert_close(again.image_embeds, trainer.image_embeds)


def test_two_rounds_of_federated_siglip_training(tmp_path, siglip_dir, digits, digits_split, test_folder):
    from coordinator.main import build_coordinator

    train_idx, _ = digits_split
    data_dirs = [
        write_image_folder(digits.subset(train_idx[i * 80 : (i + 1) * 80]), tmp_path / f"data-{i}") for i in range(2)
    ]
    url = "memory://siglip-federation"
    config = coordinator_config(
        tmp_path, siglip_dir, url, test_folder, clients=2, rounds=2, recipe="paper", local_epochs=1
    )
    coordinator = build_coordinator(config)
    assert coordinator.evaluator.clip.family is SIGLIP
    initial = coordinator.evaluator.initial_adapter()
    clients = [dataclasses.replace(c, recipe="paper") for c in client_configs(tmp_path, siglip_dir, url, data_dirs)]
    agents, threads = start_agents(clients)
    try:
        report = coordinator.run()
    finally:
        for t in threads:
            t.join(60)
    assert [r["participants"] for r in report["rounds"]] == [2, 2]
    assert [a.rounds_trained for a in agents] == [2, 2]
    assert all(a.trainer.family is SIGLIP and a.trainer.cache_status == "built" for a in agents)
    saved = load_file(str(tmp_path / "out" / "global_adapter" / "adapter_model.safetensors"))
    assert set(saved) == set(initial)
    assert max(float(np.abs(saved[k] - initial[k]).max()) for k in saved) > 1e-4


def test_siglip_export_validates_and_infers_with_siglip_preprocessing(tmp_path, siglip_dir, test_folder):
    from export.infer import run_infer
    from export.manifest import Manifest
    from export.pipeline import export_and_validate
    from export.preprocess import ImagePreprocessor
    from flora.modeling import scoring

    model = attach_lora(load_model(siglip_dir).model, get_recipe("both-towers"))
    torch.manual_seed(3)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.2 for k, v in get_adapter_state(model).items()})
    adapter = save_adapter_dir(model, tmp_path / "adapter", base_model=str(siglip_dir))
    eval_data = load_image_folder(test_folder)
    out = tmp_path / "onnx"
    result = export_and_validate(
        str(siglip_dir),
        adapter,
        out,
        eval_data=eval_data,
        prompt_template=TEMPLATE,
        parts="model,vision,text",
        latency_repeats=1,
    )
    assert result.ok and result.max_abs_diff <= 1e-4
    assert result.onnxruntime_accuracy == pytest.approx(result.pytorch_accuracy, abs=1e-9)
    manifest = Manifest.read(out)
    assert manifest.family == "siglip" and manifest.logit_bias != 0.0

    # The torch-free preprocessing is SigLIP's: a square resize, mean = std = 0.5, no crop.
    from export.merge import merge_adapter

    merged = merge_adapter(str(siglip_dir), adapter)
    paths = [sorted((test_folder / d).iterdir())[0] for d in ("0", "3", "7", "9")]
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    ours = ImagePreprocessor.from_dir(out, "siglip")(images)
    np.testing.assert_allclose(ours, pixel_values(merged.image_processor, images).numpy(), atol=1e-6)

    report = run_infer(out, paths, top_k=1)
    labels = [str(d) for d in range(10)]
    logits = scoring.zero_shot_logits(
        merged.model,
        pixel_values(merged.image_processor, images),
        SIGLIP.tokenize(merged.tokenizer, [TEMPLATE.format(label=x) for x in labels]),
    )
    assert [r["top_k"][0]["label"] for r in report["results"]] == [labels[i] for i in logits.argmax(dim=1).tolist()]
