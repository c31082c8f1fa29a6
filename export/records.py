"""What an export produced, as typed records: one `ExportRecord` per ONNX file, one `ExportResult` per export.

`flora export` prints `ExportResult.to_dict()`, the manifest keeps it as its report, and the demo
copies parts of it into report.json; `to_dict()` is the one JSON boundary (non-finite numbers become None).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flora.records import json_safe


@dataclasses.dataclass
class ExportRecord:
    """One ONNX file: its validation against PyTorch, its scores on the scoring set, its size and speed."""

    part: str  # model, vision or text (export.parts)
    precision: str  # fp32, fp16 or int8
    file: str  # file name inside the export directory
    bytes: int
    validation: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # input set -> comparison
    test: dict[str, Any] = dataclasses.field(default_factory=dict)  # accuracy and agreement on the scoring set
    latency_ms_batch1_cpu: float | None = None
    passed: bool = True
    problem: str | None = None  # why it did not pass, with the fix
    int8_scheme: str | None = None  # int8 only: the scheme kept
    int8_attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # int8 only: every scheme tried

    def agreement(self, reference: str) -> float:
        """Top-1 agreement with `reference` ("pytorch" or "fp32") on the scoring set."""
        return self.test[f"agreement_with_{reference}"]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.int8_scheme is None:  # fields of int8 files only
            del out["int8_scheme"], out["int8_attempts"]
        return json_safe(out)


@dataclasses.dataclass
class ExportResult:
    """The whole export: the primary file, the worst fp32 deviation from PyTorch, every file, every problem."""

    path: str  # the primary fp32 file (the first part asked for)
    bytes: int
    max_abs_diff: float  # worst over every fp32 file and validation input set
    min_cosine: float
    tolerance: float
    agreement_threshold: float
    out_dir: str
    manifest: str
    exports: list[ExportRecord]
    merge_base: dict[str, Any]
    zero_shot_head: str | None = None
    # With evaluation data only:
    onnxruntime_accuracy: float | None = None
    pytorch_accuracy: float | None = None
    test_max_abs_diff: float | None = None
    test_examples: int | None = None

    @property
    def problems(self) -> list[str]:
        return [r.problem for r in self.exports if r.problem]

    @property
    def ok(self) -> bool:
        """Every file passed: fp32/fp16 within tolerance of PyTorch, fp16/int8 at or above the agreement threshold."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["exports"] = [r.to_dict() for r in self.exports]
        if self.test_examples is None:  # no evaluation data: leave its keys out rather than write nulls
            for key in ("onnxruntime_accuracy", "pytorch_accuracy", "test_max_abs_diff", "test_examples"):
                del out[key]
        out["problems"], out["ok"] = self.problems, self.ok
        return json_safe(out)
