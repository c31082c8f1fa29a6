"""The non-random start: font-rendered digits (seeded) and the tiny CLIP pretrained on them (cached by settings)."""

from __future__ import annotations

import json

import numpy as np

from flora.data.rendered_digits import rendered_digits
from flora.modeling.loading import load_clip
from flora.modeling.pretrain import PretrainSettings, pretrained_digits_model
from flora.modeling.tiny import write_tiny_clip


def pixels(data):
    return np.stack([np.asarray(image) for image in data.images])


def test_rendered_digits_are_seeded_balanced_and_shaped_like_sklearns():
    first, again, other = rendered_digits(6, seed=3), rendered_digits(6, seed=3), rendered_digits(6, seed=4)
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(other))
    assert np.bincount(first.labels).tolist() == [6] * 10 and first.class_names == [str(d) for d in range(10)]
    assert first.images[0].size == (8, 8) and first.images[0].mode == "RGB"
    assert all(pixels(first)[i].max() > 100 for i in range(len(first)))  # every image has ink


def test_the_pretrained_start_is_cached_by_its_settings(tmp_path):
    import torch

    settings = PretrainSettings(per_class=4, epochs=1, batch_size=20)
    path = pretrained_digits_model(settings, cache_dir=tmp_path)
    info = json.loads((path / "pretrain.json").read_text())
    assert info["settings"]["per_class"] == 4 and info["seconds"] > 0
    weights = path / "model.safetensors"
    made = weights.stat().st_mtime_ns
    assert pretrained_digits_model(settings, cache_dir=tmp_path) == path  # the same settings: reused, not re-run
    assert weights.stat().st_mtime_ns == made
    assert PretrainSettings(per_class=4, epochs=2, batch_size=20).key() != settings.key()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind

    trained = load_clip(str(path)).model.state_dict()
    random = load_clip(str(write_tiny_clip(tmp_path / "random", seed=0))).model.state_dict()
    changed = [k for k in random if not torch.equal(random[k], trained[k])]
    assert any("vision_model" in k for k in changed) and any("text_model" in k for k in changed)
