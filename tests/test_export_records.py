"""The export's typed records at their JSON boundary: keys, omitted fields, problems and `ok`."""

from __future__ import annotations

import json

from export.records import ExportRecord, ExportResult


def _record(**kw) -> ExportRecord:
    base = dict(part="model", precision="fp32", file="model.onnx", bytes=10, latency_ms_batch1_cpu=1.5)
    return ExportRecord(**{**base, **kw})


def _result(records, **kw) -> ExportResult:
    base = dict(
        path="out/model.onnx", bytes=10, max_abs_diff=2e-6, min_cosine=1.0, tolerance=1e-4,
        agreement_threshold=0.99, out_dir="out", manifest="out/flora_export.json", exports=records,
        merge_base={"used": "original"},
    )  # fmt: skip
    return ExportResult(**{**base, **kw})


def test_a_failed_file_makes_the_result_not_ok_and_says_why():
    bad = _record(precision="int8", file="model.int8.onnx", passed=False, problem="agreement 97% < 99%")
    bad.int8_scheme, bad.int8_attempts = "full", [{"scheme": "full", "agreement_with_fp32": 0.97}]
    result = _result([_record(), bad])
    assert not result.ok and result.problems == ["agreement 97% < 99%"]
    out = result.to_dict()
    assert out["ok"] is False and out["problems"] == ["agreement 97% < 99%"]
    assert out["exports"][1]["int8_scheme"] == "full" and "int8_scheme" not in out["exports"][0]
    json.dumps(out, allow_nan=False)


def test_without_evaluation_data_its_keys_are_left_out_and_with_it_they_are_kept():
    assert "onnxruntime_accuracy" not in _result([_record()]).to_dict()
    scored = _result(
        [_record()], onnxruntime_accuracy=0.8, pytorch_accuracy=0.8, test_max_abs_diff=1e-6, test_examples=5
    )
    out = scored.to_dict()
    assert scored.ok and out["ok"] is True and out["test_examples"] == 5 and out["onnxruntime_accuracy"] == 0.8


def test_non_finite_numbers_become_null_in_json():
    out = _result([_record(latency_ms_batch1_cpu=float("nan"))], max_abs_diff=float("inf")).to_dict()
    assert out["max_abs_diff"] is None and out["exports"][0]["latency_ms_batch1_cpu"] is None
    json.dumps(out, allow_nan=False)
