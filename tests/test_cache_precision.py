"""The image cache's bfloat16 precision: embeddings close to float32, rows kept apart, refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from edge_client.cache import EmbeddingStore
from edge_client.cache_build import cpu_has_bf16, embed_images, resolve_cache_precision
from edge_client.config import ClientConfig
from edge_client.trainer import LocalTrainer
from flora.errors import ConfigError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

needs_bf16_cpu = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has neither AMX nor AVX512-BF16")


@pytest.fixture(scope="module")
def data(digits):
    return digits.subset(range(64))


def test_bfloat16_embeddings_are_within_tolerance_of_float32(tiny_model_dir, data):
    # embed_images itself runs bf16 autocast on any CPU (emulated where the instructions are missing): the
    # tolerance is a property of the numbers, checked everywhere; the speed is what needs the hardware.
    clip = load_clip(tiny_model_dir)
    fc1 = clip.model.vision_model.encoder.layers[0].mlp.fc1
    weight = fc1.weight
    exact = embed_images(clip, clip.model, data.images, precision="float32", chunk=32)
    fast = embed_images(clip, clip.model, data.images, precision="bfloat16", chunk=32)
    assert fc1.weight is weight and weight.dtype == torch.float32  # the tower's own float weights are back
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    assert not torch.equal(fast, exact)  # bf16 kernels really ran
    cosine = torch.nn.functional.cosine_similarity(fast, exact, dim=1)
    relative = (fast - exact).norm(dim=1) / exact.norm(dim=1)
    # The tolerance edge_client/cache_build.py states (ViT-B/32: cosine >= 0.99999, relative L2 <= 0.5%).
    assert float(cosine.min()) >= 0.9999
    assert float(relative.max()) <= 0.01


@needs_bf16_cpu
def test_a_bfloat16_cache_is_keyed_apart_from_a_float32_one(tiny_model_dir, data, tmp_path):
    def make(precision):
        clip = load_clip(tiny_model_dir)
        return LocalTrainer(
            clip, get_recipe("paper"), data, progress=False, cache_dir=tmp_path, cache_precision=precision
        )

    fast = make("bfloat16")
    assert fast.cache_precision == "bfloat16" and fast.cache_status == "built"
    bf16_key = fast._model_key
    assert EmbeddingStore(tmp_path).load(bf16_key)[1] == "hit"
    again = make("bfloat16")  # same base, same precision: the rows are reused
    assert again.cache_status == "hit" and torch.equal(again.image_embeds, fast.image_embeds)
    exact = make("float32")  # another precision never reuses them: every image is embedded again
    assert exact.cache_status == "built" and exact.cache_embedded == len(data)
    assert exact._model_key != bf16_key
    assert not torch.equal(exact.image_embeds, fast.image_embeds)
    # Built in place (the tower was released after), still within the tolerance of float32.
    cosine = torch.nn.functional.cosine_similarity(fast.image_embeds, exact.image_embeds, dim=1)
    assert float(cosine.min()) >= 0.9999
    assert EmbeddingStore(tmp_path).load(bf16_key) == ({}, "base model changed")


def test_bad_cache_precisions_are_refused_with_the_reason(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="cache_precision must be one of auto, float32, autocast, bfloat16, int8"):
        ClientConfig(node_id="n", model="m", data_dir=tmp_path, cache_precision="bf16")
    assert ClientConfig(node_id="n", model="m", data_dir=tmp_path, cache_precision="bfloat16").cache_precision
    with pytest.raises(ConfigError, match="bfloat16' is for an unquantized base on CPU"):
        resolve_cache_precision("bfloat16", device="cuda", autocast_dtype=torch.bfloat16, quantized=False)
    with pytest.raises(ConfigError, match="bfloat16' is for an unquantized base on CPU"):
        resolve_cache_precision("bfloat16", device="cpu", autocast_dtype=None, quantized=True)
    # A CPU without the instructions: the probe says so (this machine's answer is tested below, unpatched).
    monkeypatch.setattr("edge_client.cache_build.cpu_has_bf16", lambda: False)
    with pytest.raises(ConfigError, match=r"needs a CPU with bfloat16 instructions .*Use 'float32'"):
        resolve_cache_precision("bfloat16", device="cpu", autocast_dtype=None, quantized=False)
    monkeypatch.setattr("edge_client.cache_build.cpu_has_bf16", lambda: True)
    assert resolve_cache_precision("bfloat16", device="cpu", autocast_dtype=None, quantized=False) == "bfloat16"


def test_this_cpus_answer_decides_whether_bfloat16_is_accepted():
    if cpu_has_bf16():
        assert resolve_cache_precision("bfloat16", device="cpu", autocast_dtype=None, quantized=False) == "bfloat16"
    else:
        with pytest.raises(ConfigError, match="needs a CPU with bfloat16 instructions"):
            resolve_cache_precision("bfloat16", device="cpu", autocast_dtype=None, quantized=False)
