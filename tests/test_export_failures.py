"""Failures are reported as failures: validation past tolerance, and quantized files below the agreement bar."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import export.pipeline
from export.infer import run_infer
from export.manifest import MANIFEST_FILE
from export.onnx_export import ExportValidationError
from export.pipeline import export_and_validate
from export.providers import provider_chain
from flora.app.cli import main
from flora.data.datasets import load_image_folder
from flora.errors import ConfigError
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

TEMPLATE = "a photo of the digit {label}."


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"))
    torch.manual_seed(3)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.2 for k, v in get_adapter_state(model).items()})
    return save_adapter_dir(model, tmp_path_factory.mktemp("adapter") / "adapter", base_model=str(tiny_model_dir))


def test_validation_past_tolerance_fails_and_installs_nothing(tmp_path, tiny_model_dir, adapter):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("a user's file")
    # No real export agrees with PyTorch to 1e-12 in float32: this must be refused, not written.
    with pytest.raises(ExportValidationError, match=r"vision_model\.onnx.*do not deploy"):
        export_and_validate(str(tiny_model_dir), adapter, out, parts="vision", tolerance=1e-12, latency_repeats=1)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # no model, no manifest, no staging left


def _scrambled_copy(precision, src, dst, metadata=None, **scheme):
    """A stand-in for a quantizer that wrecked the model: every weight replaced by noise of the same scale."""
    proto = onnx.load(str(src))
    rng = np.random.default_rng(0)
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 64:
            noise = rng.normal(0, float(array.std()) + 1e-6, array.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noise, init.name))
    onnx.save(proto, str(dst))
    return dst


def test_quantized_file_below_agreement_is_flagged_not_claimed(
    tmp_path, tiny_model_dir, adapter, test_folder, monkeypatch, capsys, caplog
):
    monkeypatch.setattr(export.pipeline, "make_precision", _scrambled_copy)
    out = tmp_path / "onnx"
    code = main(
        [
            "export", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out),
            "--parts", "vision", "--precision", "int8", "--eval-data", str(test_folder),
            "--prompt-template", TEMPLATE,
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    result = json.loads(captured.out)
    assert result["ok"] is False
    assert "vision_model_int8.onnx: top-1 agreement with fp32" in result["problems"][0]
    assert "the closest of the int8 schemes tried: full, first-attention-fp32, attention-fp32" in result["problems"][0]
    assert "below the 99% threshold" in captured.err
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"]["vision"]["int8"]["passed"] is False
    assert manifest["files"]["vision"]["fp32"]["passed"] is True  # the reference is still good
    # Running the flagged file anyway warns about it.
    caplog.set_level(logging.WARNING)
    image = next((test_folder / "5").iterdir())
    run_infer(out, [image], precision="int8")
    assert "did not pass its checks" in caplog.text


def test_auto_int8_falls_back_to_fp32_attention_when_full_int8_disagrees(
    tmp_path, tiny_model_dir, adapter, test_folder, monkeypatch
):
    real_make_precision = export.pipeline.make_precision

    def full_int8_wrecked(precision, src, dst, metadata=None, *, int8_scheme="full"):
        if int8_scheme == "full":
            return _scrambled_copy(precision, src, dst, metadata)
        return real_make_precision(precision, src, dst, metadata, int8_scheme=int8_scheme)

    monkeypatch.setattr(export.pipeline, "make_precision", full_int8_wrecked)
    out = tmp_path / "onnx"
    result = export_and_validate(
        str(tiny_model_dir),
        adapter,
        out,
        eval_data=load_image_folder(test_folder),
        prompt_template=TEMPLATE,
        parts="vision",
        precisions="int8",
        agreement_threshold=0.95,
        latency_repeats=1,
    )
    assert result.ok, result.problems
    record = next(r for r in result.exports if r.precision == "int8")
    assert record.int8_scheme == "first-attention-fp32" and record.passed
    attempts = record.int8_attempts
    assert [a["scheme"] for a in attempts] == ["full", "first-attention-fp32"]  # stops at the first that passes
    assert attempts[0]["agreement_with_fp32"] < 0.95 <= attempts[1]["agreement_with_fp32"]
    assert all(a["latency_ms_batch1_cpu"] > 0 and a["bytes"] > 0 for a in attempts)
    # The kept file is the fallback one, under the usual name; the rejected attempt is gone.
    assert sorted(p.name for p in out.glob("*.onnx")) == ["vision_model.onnx", "vision_model_int8.onnx"]
    assert not list(out.glob(".*"))
    meta = {p.key: p.value for p in onnx.load(str(out / "vision_model_int8.onnx")).metadata_props}
    assert meta["int8_scheme"] == "first-attention-fp32"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"]["vision"]["int8"]["int8_scheme"] == "first-attention-fp32"


def test_auto_int8_skips_a_scheme_that_does_not_apply(tmp_path, tiny_model_dir, adapter, monkeypatch, caplog):
    real_make_precision = export.pipeline.make_precision

    def full_int8_inapplicable(precision, src, dst, metadata=None, *, int8_scheme="full"):
        if int8_scheme == "full":
            raise ValueError("keep_fp32=('x',) matches no MatMul/Gemm node")
        return real_make_precision(precision, src, dst, metadata, int8_scheme=int8_scheme)

    monkeypatch.setattr(export.pipeline, "make_precision", full_int8_inapplicable)
    caplog.set_level(logging.WARNING)
    result = export_and_validate(
        str(tiny_model_dir), adapter, tmp_path / "onnx", parts="vision", precisions="int8", latency_repeats=1
    )
    record = next(r for r in result.exports if r.precision == "int8")
    assert record.int8_attempts[0] == {"scheme": "full", "error": "keep_fp32=('x',) matches no MatMul/Gemm node"}
    assert record.int8_scheme != "full"
    assert "int8 scheme full does not apply" in caplog.text


def test_an_explicit_int8_scheme_is_the_only_one_tried(tmp_path, tiny_model_dir, adapter, monkeypatch, capsys):
    monkeypatch.setattr(export.pipeline, "make_precision", _scrambled_copy)
    code = main(
        [
            "export", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "onnx"),
            "--parts", "vision", "--precision", "int8", "--int8-scheme", "full", "--prompt-template", TEMPLATE,
        ]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == 1
    record = next(r for r in result["exports"] if r["precision"] == "int8")
    assert [a["scheme"] for a in record["int8_attempts"]] == ["full"] and not record["passed"]
    with pytest.raises(ConfigError, match="choose from: auto, full, first-attention-fp32, attention-fp32"):
        export_and_validate(str(tiny_model_dir), adapter, tmp_path, precisions="int8", int8_scheme="int4")


def test_unknown_part_or_precision_is_refused_with_the_choices(tmp_path, tiny_model_dir, adapter, capsys):
    code = main(
        [
            "export",
            "--base",
            str(tiny_model_dir),
            "--adapter",
            str(adapter),
            "--out",
            str(tmp_path),
            "--parts",
            "vision,audio",
        ]
    )
    assert code == 2 and "choose from: model, vision, text" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="choose from: fp32, fp16, int8"):
        export_and_validate(str(tiny_model_dir), adapter, tmp_path, precisions="int4")


def test_provider_fallback_chain():
    assert provider_chain("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert provider_chain("tensorrt", ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])[
        0
    ] == ("TensorrtExecutionProvider")
    assert provider_chain("cuda", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="choose from: tensorrt, cuda, cpu"):
        provider_chain("npu", ["CPUExecutionProvider"])
