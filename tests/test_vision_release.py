"""A text-only recipe lets the vision tower go once the image cache is built; it comes back only when needed."""

from __future__ import annotations

import gc
import shutil
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from edge_client.trainer import LocalTrainer, TrainSettings
from flora.data.datasets import LabeledImages, pixel_values
from flora.modeling import scoring
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.modeling.residency import ReleasedModule, is_released

TEMPLATE = "a photo of the digit {label}."
SETTINGS = TrainSettings(local_epochs=1, learning_rate=5e-3, batch_size=32, prompt_template=TEMPLATE)


def make(model_dir, data, **kwargs):
    kwargs.setdefault("progress", False)
    clip = load_clip(model_dir, quantization=kwargs.pop("quantization", "none"))
    return LocalTrainer(clip, get_recipe(kwargs.pop("recipe", "paper")), data, **kwargs)


def with_extra_image(data: LabeledImages, seed: int) -> LabeledImages:
    pixels = np.random.default_rng(seed).integers(0, 256, np.array(data.images[0]).shape, dtype=np.uint8)
    return LabeledImages([*data.images, Image.fromarray(pixels)], np.append(data.labels, 3), data.class_names)


@pytest.fixture(scope="module")
def data(digits):
    return digits.subset(range(96))


def test_the_vision_tower_is_released_after_the_cache_and_reloaded_only_for_new_images(tiny_model_dir, data, tmp_path):
    trainer = make(tiny_model_dir, data, cache_dir=tmp_path)
    assert trainer.cache_status == "built" and is_released(trainer.clip)
    assert isinstance(trainer.clip.model.vision_model, ReleasedModule)
    assert not any("vision_model" in name for name, _ in trainer.model.named_parameters())
    start = {k: v.numpy() for k, v in trainer.adapter_state().items()}
    _, metrics = trainer.train_round(start, SETTINGS, round_=1)  # training needs no tower
    assert metrics["vision_tower_released"] == 1 and is_released(trainer.clip)

    # A new image: the tower comes back, embeds that one image (exactly as a resident tower would), goes again.
    before = trainer.image_embeds.clone()
    more = with_extra_image(data, seed=5)
    trainer.set_data(more)
    assert trainer.cache_status == "updated" and trainer.cache_embedded == 1 and is_released(trainer.clip)
    assert torch.equal(trainer.image_embeds[: len(data)], before)
    resident = make(tiny_model_dir, more, release_vision_tower=False)  # no cache dir: embeds everything itself
    assert not is_released(resident.clip)
    # Equal to float rounding: one image alone and in a batch of 97 round differently (6e-8 here).
    torch.testing.assert_close(trainer.image_embeds, resident.image_embeds, rtol=0, atol=1e-6)

    # Same images again after a restart: the cache answers; the tower is loaded by the restart, then let go.
    again = make(tiny_model_dir, more, cache_dir=tmp_path)
    assert again.cache_status == "hit" and again.cache_embedded == 0 and is_released(again.clip)


def test_a_changed_checkpoint_on_disk_rebuilds_every_row_when_the_tower_comes_back(
    tiny_model_dir, data, tmp_path, tmp_path_factory
):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    trainer = make(model_dir, data, cache_dir=tmp_path / "cache")
    assert is_released(trainer.clip)
    from flora.modeling.tiny import write_tiny_clip

    other = write_tiny_clip(tmp_path_factory.mktemp("other") / "tiny-clip", seed=1)
    shutil.rmtree(model_dir)
    shutil.copytree(other, model_dir)  # the base was replaced under the running trainer
    trainer.set_data(with_extra_image(data, seed=6))
    assert trainer.cache_status == "built" and trainer.cache_embedded == len(data) + 1
    fresh = make(model_dir, with_extra_image(data, seed=6), release_vision_tower=False)
    torch.testing.assert_close(trainer.image_embeds, fresh.image_embeds, rtol=0, atol=1e-6)


def test_releasing_frees_the_tower_and_a_quantized_one_comes_back_bit_for_bit(tiny_model_dir, data, tmp_path):
    clip = load_clip(tiny_model_dir, quantization="4bit")
    tower = weakref.ref(clip.model.vision_model)
    trainer = LocalTrainer(clip, get_recipe("paper"), data, progress=False, cache_dir=tmp_path)
    gc.collect()
    assert tower() is None  # nothing holds the released modules: their memory is returned
    # The restored 4-bit tower has the fingerprint of the first: one new image costs one embedding, not all.
    trainer.set_data(with_extra_image(data, seed=7))
    assert trainer.cache_status == "updated" and trainer.cache_embedded == 1 and is_released(trainer.clip)


def test_the_release_collects_garbage_only_when_a_reference_cycle_holds_the_tower(tiny_model_dir, monkeypatch):
    from flora.modeling.residency import release_image_path

    collections = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or collect(*a))
    gc.disable()  # no automatic pass in between: what frees the tower is the release's own doing
    try:
        plain = load_clip(tiny_model_dir)
        plain.model.requires_grad_(False)  # frozen, as the trainer's recipe leaves it
        tower = weakref.ref(plain.model.vision_model)
        assert release_image_path(plain) > 0
        assert tower() is None and collections == []  # reference counting freed it: no full pass paid
        cyclic = load_clip(tiny_model_dir)
        cyclic.model.requires_grad_(False)
        cyclic.model.vision_model.loop = [cyclic.model.vision_model]  # something holds it in a cycle
        tower = weakref.ref(cyclic.model.vision_model)
        assert release_image_path(cyclic) > 0
        assert tower() is None and collections == [1]  # the collector was needed, and ran
    finally:
        gc.enable()


def test_evaluation_still_works_after_the_release(tiny_model_dir, data, tmp_path, digits):
    released = make(tiny_model_dir, data, cache_dir=tmp_path)
    resident = make(tiny_model_dir, data, release_vision_tower=False)
    start = {k: v.numpy() for k, v in resident.adapter_state().items()}
    adapter, _ = released.train_round(start, SETTINGS, round_=1)
    resident.train_round(start, SETTINGS, round_=1)
    assert is_released(released.clip) and not is_released(resident.clip)

    # From the cache, without the tower: the same figures as the resident model through its tower.
    test = digits.subset(range(96, 160))
    prompts = scoring.class_prompts(test.class_names, TEMPLATE)
    local = released.evaluate_local(TEMPLATE)
    assert is_released(released.clip)
    reference = scoring.evaluate(
        resident.model,
        resident.clip.tokenizer,
        pixel_values(resident.clip.image_processor, data.images),
        data.labels,
        scoring.class_prompts(data.class_names, TEMPLATE),
    )
    assert local["accuracy"] == pytest.approx(reference["accuracy"])

    # Through the model on new images: the tower is reloaded on first use, and the figures are the same.
    pixels = pixel_values(released.clip.image_processor, test.images)
    got = scoring.evaluate(released.model, released.clip.tokenizer, pixels, test.labels, prompts)
    expected = scoring.evaluate(resident.model, resident.clip.tokenizer, pixels, test.labels, prompts)
    assert not is_released(released.clip)
    assert got["accuracy"] == pytest.approx(expected["accuracy"])
    # The next round lets it go again.
    _, metrics = released.train_round(adapter, SETTINGS, round_=2)
    assert metrics["vision_tower_released"] == 1 and is_released(released.clip)


def test_int8_cache_embeddings_are_within_tolerance_of_float32(tiny_model_dir, data):
    exact = make(tiny_model_dir, data, cache_precision="float32")
    fast = make(tiny_model_dir, data, cache_precision="int8")
    assert fast.cache_precision == "int8" and exact.cache_precision == "float32"
    cosine = torch.nn.functional.cosine_similarity(fast.image_embeds, exact.image_embeds, dim=1)
    assert not torch.equal(fast.image_embeds, exact.image_embeds)  # int8 kernels really ran
    assert float(cosine.min()) >= 0.999  # the tolerance edge_client/cache_build.py states


def test_duplicate_images_are_embedded_once(tiny_model_dir, data):
    doubled = LabeledImages(
        [*data.images, *data.images[:10]], np.append(data.labels, data.labels[:10]), data.class_names
    )
    trainer = make(tiny_model_dir, doubled)
    assert trainer.cache_embedded == len(data)
    assert torch.equal(trainer.image_embeds[len(data) :], trainer.image_embeds[:10])


def test_dropping_the_mapped_pages_of_a_tower_loses_nothing(tiny_model_dir, data):
    """madvise(DONTNEED) on the checkpoint's map: the pages go, and whatever reads them again gets the file's bytes."""
    from flora.modeling.residency import drop_mapped_pages

    clip = load_clip(tiny_model_dir)  # float32 on CPU: the weights are views of the memory-mapped checkpoint
    pixels = pixel_values(clip.image_processor, data.images[:8])
    prompts = scoring.tokenize(clip.tokenizer, scoring.class_prompts(data.class_names, TEMPLATE))
    with torch.no_grad():
        images, texts = clip.family.image_embeddings(clip.model, pixels), scoring.text_embeddings(clip.model, prompts)
        assert drop_mapped_pages(clip.model.vision_model) > 0  # the tower's pages were in the map, and went
        assert drop_mapped_pages(clip.model.text_model) > 0
        assert torch.equal(clip.family.image_embeddings(clip.model, pixels), images)
        assert torch.equal(scoring.text_embeddings(clip.model, prompts), texts)
