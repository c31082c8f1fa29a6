"""Every part (whole model, vision tower, text tower) in every precision (fp32, fp16, int8), on the tiny model.

One export with merge base "auto" serves the module; parity is checked twice: from the
pipeline's report, and independently here by running each file against the merged PyTorch model.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from export.manifest import Manifest
from export.merge import merge_adapter
from export.metadata import file_sha256
from export.parts import PARTS
from export.pipeline import export_and_validate
from export.zero_shot import ZeroShotHead
from flora.data.datasets import load_image_folder, pixel_values
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, save_adapter_dir, set_adapter_state
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe

TEMPLATE = "a photo of the digit {label}."
ALL = [(part, precision) for part in ("model", "vision", "text") for precision in ("fp32", "fp16", "int8")]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model_dir):
    model = attach_lora(load_clip(tiny_model_dir).model, get_recipe("both-towers"))
    torch.manual_seed(1)
    set_adapter_state(model, {k: torch.randn_like(v) * 0.2 for k, v in get_adapter_state(model).items()})
    return save_adapter_dir(model, tmp_path_factory.mktemp("adapter") / "adapter", base_model=str(tiny_model_dir))


@pytest.fixture(scope="module")
def full_export(tmp_path_factory, tiny_model_dir, adapter, test_folder):
    out = tmp_path_factory.mktemp("export") / "onnx"
    result = export_and_validate(
        str(tiny_model_dir),
        adapter,
        out,
        eval_data=load_image_folder(test_folder),
        prompt_template=TEMPLATE,
        parts="model,vision,text",
        precisions="fp32,fp16,int8",
        merge_base="auto",
        agreement_threshold=0.95,
        latency_repeats=2,
    )
    return out, result


def _record(result, part, precision):
    return next(r for r in result.exports if (r.part, r.precision) == (part, precision))


def test_every_part_and_precision_is_written_and_listed(full_export):
    out, _ = full_export
    manifest = Manifest.read(out)
    for part, precision in ALL:
        file = PARTS[part].filename(precision)
        assert (out / file).is_file()
        assert manifest.files[part][precision]["file"] == file
    assert not list(out.glob(".export-staging-*"))  # the staging folder is gone


@pytest.mark.parametrize(("part", "precision"), ALL)
def test_reported_parity_for_every_part_and_precision(full_export, part, precision):
    _, result = full_export
    record = _record(result, part, precision)
    checks = record.validation
    assert set(checks) == {"random", "real"}  # random tensors and processed real images
    if precision == "fp32":
        assert all(c["max_abs_diff"] <= 1e-4 and c["min_cosine"] > 0.9999 for c in checks.values())
        assert record.test["max_abs_diff_vs_pytorch"] <= 1e-4
        assert record.test["agreement_with_pytorch"] == 1.0
    elif precision == "fp16":
        assert all(c["min_cosine"] >= 0.999 for c in checks.values())
        assert record.test["agreement_with_fp32"] >= 0.99
    else:
        # int8 moves values by design; it must still point the same way and mostly agree.
        assert all(c["min_cosine"] >= 0.99 for c in checks.values())
        assert record.test["agreement_with_fp32"] >= 0.95
    assert record.test["examples"] == 359
    assert record.bytes > 0 and record.latency_ms_batch1_cpu > 0


def test_reduced_precisions_are_smaller(full_export):
    _, result = full_export
    for part in PARTS:
        fp32 = _record(result, part, "fp32").bytes
        assert _record(result, part, "fp16").bytes < 0.7 * fp32
        assert _record(result, part, "int8").bytes < 0.8 * fp32  # tiny layers: scales weigh relatively more


@pytest.fixture(scope="module")
def merged_reference(tiny_model_dir, adapter, test_folder):
    """The merged model the export should reproduce, built here independently of the pipeline."""
    clip = merge_adapter(str(tiny_model_dir), adapter, merge_base="dequantized-4bit")
    data = load_image_folder(test_folder)
    prompts = scoring.class_prompts([*data.class_names[:4], "the digit seven, written by hand"], TEMPLATE)
    inputs = {
        **clip.tokenizer(prompts, padding=True, return_tensors="pt"),
        "pixel_values": pixel_values(clip.image_processor, data.images[:7]),
    }
    with torch.no_grad():
        out = clip.model(**inputs)
    expected = {name: getattr(out, name).numpy() for name in PARTS["model"].outputs}
    return {k: v.numpy() for k, v in inputs.items()}, expected


@pytest.mark.parametrize(("part", "precision"), ALL)
def test_onnx_runtime_matches_pytorch_independently(full_export, merged_reference, part, precision):
    import onnxruntime as ort

    out, _ = full_export
    inputs, expected = merged_reference
    spec = PARTS[part]
    session = ort.InferenceSession(str(out / spec.filename(precision)), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(spec.inputs)
    assert [o.name for o in session.get_outputs()] == list(spec.outputs)
    got = dict(zip(spec.outputs, session.run(None, {name: inputs[name] for name in spec.inputs})))
    for name, value in got.items():
        ref = expected[name]
        assert value.shape == ref.shape  # 5 prompts and 7 images: not the traced batch sizes
        cos = (value * ref).sum(-1) / (np.linalg.norm(value, axis=-1) * np.linalg.norm(ref, axis=-1))
        if precision == "fp32":
            assert np.abs(value - ref).max() <= 1e-4, name
        assert cos.min() >= {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}[precision], name


def test_every_file_records_its_provenance(full_export, adapter):
    out, _ = full_export
    sha = file_sha256(adapter / "adapter_model.safetensors")
    for part, precision in ALL:
        meta = {p.key: p.value for p in onnx.load(str(out / PARTS[part].filename(precision))).metadata_props}
        assert meta["flora_version"] and meta["base_model"].endswith("tiny-clip")
        assert meta["recipe"] == "both-towers" and meta["adapter_sha256"] == sha
        assert (meta["part"], meta["precision"]) == (part, precision)
        assert meta["merge_base"] == "dequantized-4bit"


def test_batch_and_sequence_axes_are_dynamic(full_export):
    out, _ = full_export
    for part in PARTS.values():
        graph = onnx.load(str(out / part.filename("fp32"))).graph
        for tensor in [*graph.input, *graph.output]:
            dims = tensor.type.tensor_type.shape.dim
            for axis, name in part.dynamic_axes[tensor.name].items():
                assert dims[axis].dim_param == name, (part.name, tensor.name)


def test_merge_into_the_dequantized_4bit_base_matches_training_better(full_export):
    out, result = full_export
    report = result.merge_base
    diffs = report["max_abs_diff_vs_training_time"]
    assert set(diffs) == {"original", "dequantized-4bit"}
    assert diffs["dequantized-4bit"] < diffs["original"] / 5
    assert report["closer"] == report["used"] == "dequantized-4bit"
    assert Manifest.read(out).merge_base == "dequantized-4bit"


def test_zero_shot_head_holds_normalised_label_embeddings(full_export, tiny_model_dir):
    out, result = full_export
    head = ZeroShotHead.load(out / "zero_shot_head.npz")
    assert head.labels == [str(d) for d in range(10)] and head.prompt_template == TEMPLATE
    assert head.embeddings.shape == (10, 64)
    np.testing.assert_allclose(np.linalg.norm(head.embeddings, axis=1), 1.0, atol=1e-5)
    scale = float(load_clip(tiny_model_dir).model.logit_scale.detach().exp())
    assert head.logit_scale == pytest.approx(scale, rel=1e-6)
    # The vision tower plus the head scores the test split exactly as PyTorch does.
    assert _record(result, "vision", "fp32").test["accuracy"] == result.pytorch_accuracy


def test_manifest_keeps_the_report_and_is_valid_json(full_export):
    out, result = full_export
    data = json.loads((out / "flora_export.json").read_text())
    assert data["format"] == 1 and data["report"]["ok"] == result.ok
    assert result.ok, result.problems  # threshold 0.95 in this module: every file passes
    assert result.onnxruntime_accuracy == result.pytorch_accuracy and result.test_examples == 359


def test_auto_int8_keeps_full_int8_when_it_agrees(full_export):
    out, result = full_export
    manifest = Manifest.read(out)
    for part in PARTS:
        record = _record(result, part, "int8")
        assert record.passed  # threshold 0.95 here: full int8 is good enough, so nothing slower is tried
        assert record.int8_scheme == "full" and [a["scheme"] for a in record.int8_attempts] == ["full"]
        assert manifest.files[part]["int8"]["int8_scheme"] == "full"


def test_int8_can_keep_chosen_matmuls_in_fp32(full_export, tmp_path):
    from export.quantize import ATTENTION_PROJECTIONS, quantize_int8

    out, _ = full_export
    src = out / PARTS["vision"].filename("fp32")
    dst = quantize_int8(src, tmp_path / "vision_attn_fp32.onnx", keep_fp32=ATTENTION_PROJECTIONS)
    nodes = onnx.load(str(dst)).graph.node
    kept = [n.name for n in nodes if n.op_type == "MatMul" and any(k in n.name for k in ATTENTION_PROJECTIONS)]
    assert len(kept) == 4 * 2  # q, k, v and out projections of the tiny model's 2 layers stay fp32
    assert any(n.op_type == "MatMulInteger" for n in nodes)  # the MLPs and the projection are int8
    meta = {p.key: p.value for p in onnx.load(str(dst)).metadata_props}
    assert "kept fp32" in meta["quantization"]
    with pytest.raises(ValueError, match="matches no MatMul"):
        quantize_int8(src, tmp_path / "none.onnx", keep_fp32=("no_such_layer/",))


def test_int8_weights_are_unsigned_so_no_cpu_saturates_them(full_export):
    # ONNX Runtime runs U8S8 MatMulInteger (int8 weights) on x86 CPUs without VNNI with VPMADDUBSW, whose
    # int16 pair sums saturate: the same file is right on one machine and wrong on another. U8U8 is exact on all.
    out, _ = full_export
    for part in PARTS:
        proto = onnx.load(str(out / PARTS[part].filename("int8")))
        weights = {i.name: i.data_type for i in proto.graph.initializer}
        matmuls = [n for n in proto.graph.node if n.op_type == "MatMulInteger"]
        assert matmuls, part
        assert all(weights[n.input[1]] == onnx.TensorProto.UINT8 for n in matmuls), part


def test_signed_int8_weights_are_opt_in_and_only_where_the_cpu_has_vnni(full_export, tmp_path, monkeypatch):
    # For a file that runs only on the CPU that built it (the image cache's): int8 weights where VNNI makes
    # U8S8 exact and fast.
    from export.quantize import quantize_int8
    from flora.onnx_build import cpu_has_vnni

    out, _ = full_export
    dst = quantize_int8(out / PARTS["vision"].filename("fp32"), tmp_path / "vision_s8.onnx", signed_weights=True)
    proto = onnx.load(str(dst))
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMulInteger"]
    assert matmuls and all(weights[n.input[1]] == onnx.TensorProto.INT8 for n in matmuls)
    assert "QInt8" in {p.key: p.value for p in proto.metadata_props}["quantization"]

    flags = tmp_path / "cpuinfo"
    monkeypatch.setattr("flora.onnx_build.CPUINFO", flags)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for line, expected in (("fpu avx2 avx512_vnni", True), ("fpu avx2", False), ("fpu avx_vnni sse", True)):
        flags.write_text(f"flags\t\t: {line}\n")
        assert cpu_has_vnni() is expected
    flags.unlink()
    assert cpu_has_vnni() is False  # no /proc/cpuinfo: the safe answer
    flags.write_text("Features\t: asimd asimddp\n")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert cpu_has_vnni() is False
