"""Frozen-tower image embeddings: computed once, same loss and gradients as without, rebuilt when anything changes."""

from __future__ import annotations

import numpy as np
import pytest

from edge_client.cache import FILE_NAME
from edge_client.trainer import LocalTrainer, TrainSettings
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

TEMPLATE = "a photo of the digit {label}."
SETTINGS = TrainSettings(local_epochs=1, learning_rate=5e-3, batch_size=32, prompt_template=TEMPLATE)


def make(model_dir, data, **kwargs):
    kwargs.setdefault("progress", False)
    recipe = kwargs.pop("recipe", "paper")
    return LocalTrainer(
        load_clip(model_dir, quantization=kwargs.pop("quantization", "none")), get_recipe(recipe), data, **kwargs
    )


@pytest.fixture(scope="module")
def data(digits):
    return digits.subset(range(160))


def test_cached_path_gives_the_same_loss_gradients_and_update(tiny_model_dir, data, tmp_path):
    cached = make(tiny_model_dir, data, cache_dir=tmp_path)
    plain = make(tiny_model_dir, data, cache_image_embeddings=False)
    assert cached.cache_status == "built" and cached.pixels is None  # no pixel tensor is kept at all
    assert plain.cache_status == "off" and plain.image_embeds is None
    idx = np.random.default_rng(1).permutation(len(data))[:48]
    loss_cached, grads_cached = cached.batch_gradients(idx, TEMPLATE)
    loss_plain, grads_plain = plain.batch_gradients(idx, TEMPLATE)
    assert loss_cached == pytest.approx(loss_plain, rel=1e-6)
    assert set(grads_cached) == set(grads_plain) and len(grads_plain) == 4  # lora A and B of 2 text out_proj
    for name in grads_plain:
        np.testing.assert_allclose(grads_cached[name].numpy(), grads_plain[name].numpy(), rtol=1e-5, atol=1e-8)
    # A whole round (2 epochs, 5 steps each) ends at the same adapter with the same losses.
    start = {k: v.numpy() for k, v in plain.adapter_state().items()}
    settings = TrainSettings(local_epochs=2, learning_rate=5e-3, batch_size=32, prompt_template=TEMPLATE)
    new_cached, m_cached = cached.train_round(start, settings, round_=1)
    new_plain, m_plain = plain.train_round(start, settings, round_=1)
    assert m_cached["train_loss"] == pytest.approx(m_plain["train_loss"], rel=1e-5)
    for name in new_plain:
        np.testing.assert_allclose(new_cached[name].numpy(), new_plain[name].numpy(), rtol=1e-4, atol=1e-6)
    assert m_cached["image_embeddings_cached"] == 1 and m_plain["image_embeddings_cached"] == 0
    assert m_cached["cache_seconds"] > 0  # the one-off cost, reported with the first round only
    assert "cache_seconds" not in cached.train_round(new_cached, settings, round_=2)[1]


def test_the_cache_is_reused_across_restarts_and_rebuilt_when_model_or_data_change(
    tiny_model_dir, tmp_path_factory, data, digits, tmp_path
):
    first = make(tiny_model_dir, data, cache_dir=tmp_path)
    assert first.cache_status == "built" and (tmp_path / FILE_NAME).is_file()
    again = make(tiny_model_dir, data, cache_dir=tmp_path)  # a restart: same model, same images
    assert again.cache_status == "hit"
    assert np.array_equal(again.image_embeds.numpy(), first.image_embeds.numpy())

    # Data change: one image differs by a single pixel.
    changed = data.subset(range(len(data)))
    pixels = np.array(changed.images[7])
    pixels[0, 0, 0] ^= 1
    from PIL import Image

    changed.images[7] = Image.fromarray(pixels)
    updated = make(tiny_model_dir, changed, cache_dir=tmp_path)
    assert updated.cache_status == "updated" and updated.cache_embedded == 1  # only the changed image
    assert make(tiny_model_dir, changed, cache_dir=tmp_path).cache_status == "hit"
    # More data is a change too: the one new image is embedded.
    more = make(tiny_model_dir, digits.subset(range(161)), cache_dir=tmp_path)
    assert more.cache_status == "updated" and more.cache_embedded == 2  # image 7 as it was, and image 160

    # Model change: other weights of the same architecture, or the same weights quantized.
    from flora.modeling.tiny import write_tiny_clip

    other = write_tiny_clip(tmp_path_factory.mktemp("other") / "tiny-clip", seed=1)
    assert make(other, data, cache_dir=tmp_path).cache_status == "built"
    quantized = make(tiny_model_dir, data, cache_dir=tmp_path, quantization="8bit")
    assert quantized.cache_status == "built"
    assert not np.allclose(quantized.image_embeds.numpy(), first.image_embeds.numpy())
    assert make(tiny_model_dir, data, cache_dir=tmp_path, quantization="8bit").cache_status == "hit"


def test_an_unreadable_cache_file_is_rebuilt(tiny_model_dir, data, tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"not a safetensors file")
    assert make(tiny_model_dir, data, cache_dir=tmp_path).cache_status == "built"
    assert make(tiny_model_dir, data, cache_dir=tmp_path).cache_status == "hit"


def test_no_cache_when_the_recipe_trains_the_vision_tower(tiny_model_dir, data, tmp_path):
    trainer = make(tiny_model_dir, data, recipe="both-towers", cache_dir=tmp_path)
    assert trainer.trains_images and trainer.cache_status == "off" and trainer.pixels is not None
    assert not (tmp_path / FILE_NAME).exists()


def test_a_restart_takes_the_model_key_from_the_memo_without_hashing_the_tower(
    tiny_model_dir, data, tmp_path, monkeypatch
):
    import shutil

    import edge_client.cache as cache
    from flora.modeling import fingerprint

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)  # copied just now: its identity is not settled yet
    first = make(model_dir, data, cache_dir=tmp_path / "cache")
    assert first.cache_status == "built" and not (tmp_path / "cache" / cache.MEMO_FILE_NAME).exists()
    monkeypatch.setattr(fingerprint, "SETTLE_SECONDS", 0.0)  # as if the files were older than a clock tick
    assert make(model_dir, data, cache_dir=tmp_path / "cache").cache_status == "hit"  # hashed, then remembered
    assert (tmp_path / "cache" / cache.MEMO_FILE_NAME).is_file()

    def no_hashing(*args, **kwargs):
        raise AssertionError("the memo should have answered")

    monkeypatch.setattr(cache, "model_fingerprint", no_hashing)
    again = make(model_dir, data, cache_dir=tmp_path / "cache")
    assert again.cache_status == "hit"
    assert np.array_equal(again.image_embeds.numpy(), first.image_embeds.numpy())
    # Another precision is another key: the memo does not answer for it.
    with pytest.raises(AssertionError, match="memo"):
        make(model_dir, data, cache_dir=tmp_path / "cache", cache_precision="int8")


def test_a_checkpoint_rewritten_in_place_with_its_size_and_mtime_kept_is_hashed_again_and_the_cache_rebuilt(
    tiny_model_dir, data, tmp_path, tmp_path_factory, monkeypatch
):
    """The memo's trust rests on ctime: a rewrite that keeps size, mtime and inode (cp -p over the file) and that
    the sampled content fingerprint is made blind to still changes the key, because the kernel moved ctime."""
    import os
    import shutil

    import edge_client.cache as cache
    from flora.modeling import fingerprint
    from flora.modeling.tiny import write_tiny_clip

    monkeypatch.setattr(fingerprint, "SETTLE_SECONDS", 0.0)
    monkeypatch.setattr(fingerprint, "model_fingerprint", lambda model: "blind")
    hashed = []
    full_hash = cache.model_fingerprint
    monkeypatch.setattr(cache, "model_fingerprint", lambda *a, **k: hashed.append(1) or full_hash(*a, **k))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    assert make(model_dir, data, cache_dir=tmp_path / "cache").cache_status == "built"
    assert make(model_dir, data, cache_dir=tmp_path / "cache").cache_status == "hit" and len(hashed) == 1

    weights = model_dir / "model.safetensors"
    before = weights.stat()
    other = write_tiny_clip(tmp_path_factory.mktemp("other") / "tiny-clip", seed=1)
    new_bytes = (other / "model.safetensors").read_bytes()
    assert len(new_bytes) == before.st_size and new_bytes != weights.read_bytes()
    with open(weights, "r+b") as handle:  # in place: same inode
        handle.write(new_bytes)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old mtime put back, as cp -p would
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)

    rebuilt = make(model_dir, data, cache_dir=tmp_path / "cache")
    assert rebuilt.cache_status == "built" and len(hashed) == 2  # the changed ctime sent it to the tensors
    fresh = make(other, data)  # the new weights, no cache
    np.testing.assert_array_equal(rebuilt.image_embeds.numpy(), fresh.image_embeds.numpy())
