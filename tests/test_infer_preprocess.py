"""The torch-free preprocessing of `flora infer` matches transformers' CLIP processor and tokenizer.

The NumPy/Pillow image path repeats CLIPImageProcessorPil's operations in the same order and
dtypes, so it should be bit-identical; the bound 1e-6 leaves room for nothing but float
rounding and is two orders below the 1e-4 export parity budget it feeds into.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil

from export.preprocess import ImagePreprocessor
from export.tokenizer import ClipTokenizer
from flora.errors import ConfigError

MAX_ABS_DIFF = 1e-6


def _images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (20, 75, 3), dtype=np.uint8))  # odd sizes, long side truncates
    tall = Image.fromarray(rng.integers(0, 256, (301, 199, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L")  # the digits: upscaled
    rgba = Image.fromarray(rng.integers(0, 256, (33, 47, 4), dtype=np.uint8), mode="RGBA")  # alpha onto white
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    return {"rgb": rgb, "wide": wide, "tall": tall, "gray": gray, "rgba": rgba, "palette": palette}


@pytest.mark.parametrize(
    "settings",
    [
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},  # the tiny checkpoint
        {},  # CLIP ViT-B/32 defaults: 224
        {"size": {"shortest_edge": 20}, "crop_size": {"height": 28, "width": 24}},  # crop larger: zero padding
        {"size": {"height": 30, "width": 26}, "do_center_crop": False},
    ],
    ids=["tiny", "vit-b-32", "padded-crop", "fixed-size"],
)
def test_numpy_preprocessing_matches_transformers(tmp_path, settings):
    reference = CLIPImageProcessorPil(**settings)
    reference.save_pretrained(tmp_path)  # the file a real export ships
    ours = ImagePreprocessor.from_dir(tmp_path)
    for name, image in _images().items():
        expected = reference(images=[image], return_tensors="np")["pixel_values"]
        got = ours([image])
        assert got.shape == expected.shape and got.dtype == np.float32, name
        assert np.abs(got - expected).max() <= MAX_ABS_DIFF, name


def test_legacy_preprocessor_config_is_read_like_transformers(tmp_path):
    # openai/clip-vit-base-patch32 ships this older format: ints for size and crop_size.
    legacy = {
        "crop_size": 36,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.3, 0.25],
        "resample": 3,
        "size": 40,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    reference = CLIPImageProcessorPil.from_pretrained(tmp_path)
    ours = ImagePreprocessor.from_dir(tmp_path)
    assert (ours.resize_shortest_edge, ours.crop_height) == (40, 36)
    for name, image in _images().items():
        expected = reference(images=[image], return_tensors="np")["pixel_values"]
        assert np.abs(ours([image]) - expected).max() <= MAX_ABS_DIFF, name


def test_missing_processor_config_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="flora export"):
        ImagePreprocessor.from_dir(tmp_path)


def test_tokenizers_library_matches_transformers_tokenizer(tiny_model_dir):
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = ClipTokenizer(tiny_model_dir, max_length=32)
    texts = ["a photo of the digit 7.", "A  PHOTO of a Cat!", "zero", "naïve café, 42 dogs"]
    expected = reference(texts, padding=True, truncation=True, return_tensors="np")
    got = ours(texts)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], expected["attention_mask"])
    assert got["attention_mask"].min() == 0  # the batch really was padded


def test_long_prompts_are_truncated_to_the_text_tower_length(tiny_model_dir):
    reference = AutoTokenizer.from_pretrained(tiny_model_dir)
    long_text = "a photo of " + " ".join(["the digit seven"] * 30)
    got = ClipTokenizer(tiny_model_dir, max_length=32)([long_text])
    expected = reference([long_text], truncation=True, max_length=32, return_tensors="np")
    assert got["input_ids"].shape == (1, 32)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    assert got["input_ids"][0, -1] == reference.eos_token_id  # truncation keeps the end-of-text token
