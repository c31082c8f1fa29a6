"""The image cache built by ONNX Runtime from an int8 file of the vision tower (`cache_precision = "onnx-int8"`):
rows close to float32, the file built once per base and reused, kept apart from other precisions, rebuilt when
damaged or when the base changes, refused where it cannot run."""

from __future__ import annotations

import onnx
import pytest
import torch

from edge_client import onnx_vision
from edge_client.cache import EmbeddingStore
from edge_client.cache_build import embed_images, resolve_cache_precision
from edge_client.trainer import LocalTrainer
from flora.errors import ConfigError
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe


@pytest.fixture(scope="module")
def data(digits):
    return digits.subset(range(48))


def make(model_dir, data, cache_dir, precision="onnx-int8"):
    clip = load_clip(model_dir)
    return LocalTrainer(clip, get_recipe("paper"), data, progress=False, cache_dir=cache_dir, cache_precision=precision)


def vision_files(directory):
    return sorted(directory.glob(f"{onnx_vision.FILE_PREFIX}*.onnx"))


def test_onnx_int8_rows_are_close_to_float32_and_the_file_is_built_once(tiny_model_dir, data, tmp_path):
    fast = make(tiny_model_dir, data, tmp_path)
    assert fast.cache_precision == "onnx-int8" and fast.cache_status == "built"
    (file,) = vision_files(tmp_path)
    assert fast.vision_file_seconds[1] > 0  # this build made the file
    exact = make(tiny_model_dir, data, tmp_path / "float32", precision="float32")
    assert fast.image_embeds.dtype == torch.float32 and fast.image_embeds.shape == exact.image_embeds.shape
    assert not torch.equal(fast.image_embeds, exact.image_embeds)  # int8 kernels really ran
    cosine = torch.nn.functional.cosine_similarity(fast.image_embeds, exact.image_embeds, dim=1)
    assert float(cosine.min()) >= 0.99
    assert torch.allclose(fast.image_embeds.norm(dim=1), torch.ones(len(data)), atol=1e-4)  # normalised rows

    # A cleared cache (rows gone, file kept): the rows are embedded again from the same file, unchanged.
    EmbeddingStore(tmp_path).path.unlink()
    again = make(tiny_model_dir, data, tmp_path)
    assert again.cache_status == "built" and again.vision_file_seconds == (0.0, 0.0)
    assert vision_files(tmp_path) == [file]
    assert torch.equal(again.image_embeds, fast.image_embeds)
    # The rows kept: nothing embedded, the file not opened.
    assert make(tiny_model_dir, data, tmp_path).cache_status == "hit"


def test_onnx_int8_rows_are_keyed_apart_and_follow_the_weight_scheme(tiny_model_dir, data, tmp_path, monkeypatch):
    fast = make(tiny_model_dir, data, tmp_path)
    exact = make(tiny_model_dir, data, tmp_path, precision="float32")
    assert exact.cache_status == "built" and exact._model_key != fast._model_key
    # The same base on a CPU with the other int8 kernels: other rows, another file; the old file is removed.
    other = "u8u8" if onnx_vision.weight_scheme() == "u8s8" else "u8s8"
    monkeypatch.setattr(onnx_vision, "weight_scheme", lambda: other)
    moved = make(tiny_model_dir, data, tmp_path)
    assert moved.cache_status == "built" and moved._model_key != fast._model_key
    (file,) = vision_files(tmp_path)
    assert file == onnx_vision.vision_file(tmp_path, moved._model_key)
    # ... and the file holds the weights its key names: int8 for U8S8, uint8 for U8U8.
    proto = onnx.load(str(file))
    types = {i.name: i.data_type for i in proto.graph.initializer}
    weights = {types[n.input[1]] for n in proto.graph.node if n.op_type == "MatMulInteger"}
    assert weights == {onnx.TensorProto.INT8 if other == "u8s8" else onnx.TensorProto.UINT8}


def test_a_damaged_vision_file_is_built_again(tiny_model_dir, data, tmp_path):
    fast = make(tiny_model_dir, data, tmp_path)
    (file,) = vision_files(tmp_path)
    file.write_bytes(b"not an onnx model")
    EmbeddingStore(tmp_path).path.unlink()
    # What a build killed half-way leaves: its scratch directory (the float32 file) and the partial int8 file.
    scratch = tmp_path / f".{file.name}.k3x9_a2b"
    scratch.mkdir()
    (scratch / "vision.onnx").write_bytes(b"x" * 1000)
    (tmp_path / f".{file.name}.partial").write_bytes(b"half")
    again = make(tiny_model_dir, data, tmp_path)
    assert again.vision_file_seconds[1] > 0 and vision_files(tmp_path) == [file]
    assert torch.equal(again.image_embeds, fast.image_embeds)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_embed_images_needs_the_onnx_tower(tiny_model_dir, data):
    clip = load_clip(tiny_model_dir)
    with pytest.raises(ValueError, match="needs the OnnxVisionTower"):
        embed_images(clip, clip.model, data.images, precision="onnx-int8")


def test_onnx_int8_is_refused_where_it_cannot_run(monkeypatch):
    for device, quantized in (("cuda", False), ("cpu", True)):
        with pytest.raises(ConfigError, match="'onnx-int8' is for an unquantized base on CPU"):
            resolve_cache_precision("onnx-int8", device=device, autocast_dtype=None, quantized=quantized)
    assert resolve_cache_precision("onnx-int8", device="cpu", autocast_dtype=None, quantized=False) == "onnx-int8"
    with pytest.raises(ConfigError, match="quantizes a float32 vision tower; this base is loaded in bfloat16"):
        resolve_cache_precision(
            "onnx-int8", device="cpu", autocast_dtype=None, quantized=False, weights_dtype="bfloat16"
        )
    # A device installed with [edge] only: no ONNX Runtime. Said at configuration, with the install that fixes it.
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else find_spec(name))
    with pytest.raises(ConfigError, match=r"needs onnxruntime.*pip install 'flora-edge\[edge,export\]'"):
        resolve_cache_precision("onnx-int8", device="cpu", autocast_dtype=None, quantized=False)


def test_the_onnx_tower_runs_only_for_onnx_int8(tiny_model_dir, data, tmp_path):
    clip = load_clip(tiny_model_dir)
    tower = onnx_vision.OnnxVisionTower(clip, clip.model, tmp_path, "some base")
    try:
        exact = embed_images(clip, clip.model, data.images, precision="float32")
        given = embed_images(clip, clip.model, data.images, precision="float32", onnx_tower=tower)
        fast = embed_images(clip, clip.model, data.images, precision="onnx-int8", onnx_tower=tower)
    finally:
        tower.close()
    assert torch.equal(given, exact) and not torch.equal(fast, exact)


def test_the_agent_setting_accepts_onnx_int8(tmp_path):
    from edge_client.config import ClientConfig

    config = ClientConfig(node_id="n", model="m", data_dir=tmp_path, cache_precision="onnx-int8")
    assert config.cache_precision == "onnx-int8"
    with pytest.raises(ConfigError, match=r"cache_precision must be one of .*onnx-int8"):
        ClientConfig(node_id="n", model="m", data_dir=tmp_path, cache_precision="onnx")


def test_building_the_file_leaves_the_model_in_its_mode(tiny_model_dir, tmp_path):
    clip = load_clip(tiny_model_dir)
    clip.model.train()
    path = onnx_vision.build_vision_file(clip, clip.model, tmp_path / "vision.onnx")
    assert path.is_file() and all(module.training for module in clip.model.modules())
