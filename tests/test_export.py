"""Export parity: the merged tiny model through ONNX Runtime matches PyTorch within 1e-4."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from export.onnx_export import ExportValidationError, validate_export
from export.pipeline import export_and_validate
from flora.data.datasets import load_image_folder
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

TEMPLATE = "a photo of the digit {label}."


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory, tiny_model_dir):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"))
    torch.manual_seed(1)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.2 for k, v in get_adapter_state(model).items()})
    return save_adapter_dir(model, tmp_path_factory.mktemp("adapter") / "adapter", base_model=str(tiny_model_dir))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir, trained_adapter, test_folder):
    out = tmp_path_factory.mktemp("onnx")
    result = export_and_validate(
        str(tiny_model_dir), trained_adapter, out, eval_data=load_image_folder(test_folder), prompt_template=TEMPLATE
    )
    return out, result


def test_onnx_matches_pytorch_within_tolerance(exported):
    _, result = exported
    assert result.max_abs_diff <= 1e-4
    assert result.test_max_abs_diff <= 1e-4
    assert result.min_cosine > 0.9999


def test_onnx_runtime_accuracy_equals_pytorch_accuracy(exported):
    _, result = exported
    assert result.test_examples == 359
    assert result.onnxruntime_accuracy == result.pytorch_accuracy


def test_export_uses_hf_names_and_records_metadata(exported, trained_adapter):
    out, _ = exported
    model = onnx.load(str(out / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask", "pixel_values"]
    assert [o.name for o in model.graph.output] == [
        "logits_per_image",
        "logits_per_text",
        "text_embeds",
        "image_embeds",
    ]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["lora_rank"] == "8" and len(meta["adapter_sha256"]) == 64 and "flora_version" in meta
    assert (out / "tokenizer.json").is_file()  # the processor travels with the model
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


def test_merged_model_differs_from_base(tiny_model_dir, trained_adapter):
    from export.merge import merge_adapter

    merged = merge_adapter(str(tiny_model_dir), trained_adapter).model
    base = load_clip(tiny_model_dir).model
    name = "text_model.encoder.layers.0.self_attn.out_proj.weight"
    assert not torch.allclose(merged.state_dict()[name], base.state_dict()[name])
    assert not any("lora" in k for k in merged.state_dict())


def test_validation_failure_is_reported_as_a_failure(exported, tiny_model_dir):
    out, _ = exported
    base = load_clip(tiny_model_dir)  # the unmerged base: its outputs differ from the merged export
    inputs = {
        **base.tokenizer(["a photo of the digit 1."], return_tensors="pt"),
        "pixel_values": torch.randn(2, 3, 32, 32),
    }
    with pytest.raises(ExportValidationError, match="do not deploy"):
        validate_export(base.model, out / "model.onnx", dict(inputs), tolerance=1e-4)
