"""Export a (merged) CLIPModel, or one of its towers, to ONNX with torch.onnx.export; validate it.

Parts, names and dynamic axes come from export/parts.py. We use the TorchScript exporter
(dynamo=False): it traces CLIP without needing onnxscript and produces a graph ONNX Runtime
runs on CPU, CUDA and TensorRT. optimum's exporters are not used: optimum-onnx pins
transformers < 4.58 and this project is on transformers 5.

Validation runs the same inputs through PyTorch and ONNX Runtime and compares every output by
max abs difference and cosine similarity; past tolerance it raises ExportValidationError.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.metadata import export_metadata, file_sha256, stamp
from export.parts import WHOLE_MODEL, OnnxPart, get_part
from export.providers import make_session
from flora import __version__, onnx_build
from flora.errors import FloraError
from flora.files import atomic_path
from flora.modeling.families import family_for
from flora.onnx_build import trace_to_onnx

log = logging.getLogger(__name__)

# Kept for callers of the first version of this module (whole CLIP model only).
INPUT_NAMES = list(WHOLE_MODEL.inputs)
OUTPUT_NAMES = list(WHOLE_MODEL.outputs)
DYNAMIC_AXES = WHOLE_MODEL.dynamic_axes

__all__ = [
    "ExportValidationError",
    "ValidationResult",
    "compare_outputs",
    "export_clip",
    "export_metadata",
    "export_part",
    "file_sha256",
    "onnx_outputs",
    "torch_outputs",
    "validate_export",
    "validate_part",
]


class ExportValidationError(FloraError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance: the export must not be trusted."""


@dataclass
class ValidationResult:
    max_abs_diff: float
    min_cosine: float
    tolerance: float
    min_cosine_required: float = 0.0
    logits_tolerance: float | None = None  # None: same as tolerance
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        found = []
        for name, stats in self.per_output.items():
            limit = self.logits_tolerance if name.startswith("logits") and self.logits_tolerance else self.tolerance
            if not stats["max_abs_diff"] <= limit:  # `not <=` also catches NaN
                found.append(f"{name}: max abs difference {stats['max_abs_diff']:.3g} > tolerance {limit:g}")
            if not stats["min_cosine"] >= self.min_cosine_required:
                found.append(f"{name}: cosine similarity {stats['min_cosine']:.6f} < {self.min_cosine_required:g}")
        if not self.per_output and not self.max_abs_diff <= self.tolerance:
            found.append(f"max abs difference {self.max_abs_diff:.3g} > tolerance {self.tolerance:g}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "min_cosine": self.min_cosine, "per_output": self.per_output}


# -- wrappers: ONNX wants a plain tuple of tensors, not transformers' output objects --------------


def part_module(model: Any, part: OnnxPart):
    """`part` of `model` as a module taking `part.inputs` positionally (flora.onnx_build.part_module)."""
    return onnx_build.part_module(model, part.name, part.inputs)


def export_part(
    model: Any, part: OnnxPart, sample: dict[str, Any], path: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Trace `part` of `model` on `sample` and write it to `path` atomically, with metadata."""
    import onnx

    path = Path(path)
    with atomic_path(path) as tmp:
        module = part_module(model, part)
        args = tuple(sample[name] for name in part.inputs)
        trace_to_onnx(
            module, args, tmp, input_names=part.inputs, output_names=part.outputs, dynamic_axes=part.dynamic_axes
        )
        proto = onnx.load(str(tmp))
        stamp(proto, {"flora_version": __version__, **(metadata or {}), "part": part.name, "precision": "fp32"})
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return path


def export_clip(
    model: Any, sample: dict[str, Any], path: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write the whole CLIP model to `path` (a .onnx file), with metadata in the model's properties."""
    return export_part(model, get_part("model", family_for(model)), sample, path, metadata=metadata)


# -- validation --------------------------------------------------------------------------------


def torch_outputs(model: Any, part: OnnxPart, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = part_module(model, part)(*(inputs[name] for name in part.inputs))
    out = out if isinstance(out, tuple) else (out,)
    return {name: t.float().numpy() for name, t in zip(part.outputs, out)}


def onnx_outputs(path: str | Path, part: OnnxPart, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    session, _ = make_session(path, "cpu")
    feeds = {name: np.asarray(inputs[name]) for name in part.inputs}
    return dict(zip(part.outputs, session.run(list(part.outputs), feeds)))


def compare_outputs(reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max abs difference, and the lowest cosine similarity between matching rows."""
    stats = {}
    for name, ref in reference.items():
        out = np.asarray(got[name], dtype=np.float32)
        if out.shape != ref.shape:
            raise ExportValidationError(f"{name}: ONNX Runtime gave shape {out.shape}, PyTorch {ref.shape}")
        a, b = ref.reshape(ref.shape[0], -1).astype(np.float64), out.reshape(out.shape[0], -1).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        stats[name] = {"max_abs_diff": float(np.abs(ref - out).max()), "min_cosine": float(cos.min())}
    return stats


def summarize(
    stats: dict[str, dict[str, float]],
    *,
    tolerance: float,
    min_cosine: float = 0.0,
    logits_tolerance: float | None = None,
) -> ValidationResult:
    return ValidationResult(
        max_abs_diff=max(s["max_abs_diff"] for s in stats.values()),
        min_cosine=min(s["min_cosine"] for s in stats.values()),
        tolerance=tolerance,
        min_cosine_required=min_cosine,
        logits_tolerance=logits_tolerance,
        per_output=stats,
    )


def raise_unless_ok(result: ValidationResult, what: str) -> ValidationResult:
    if not result.ok:
        raise ExportValidationError(
            f"{what}: ONNX Runtime differs from PyTorch beyond tolerance ({'; '.join(result.problems())}); "
            "do not deploy this export. If the model is very large or its logit scale high, a looser "
            "--tolerance may be justified; otherwise report it as a bug with this message."
        )
    return result


def validate_part(
    model: Any,
    part: OnnxPart,
    onnx_path: str | Path,
    inputs: dict[str, Any],
    *,
    tolerance: float = 1e-4,
    min_cosine: float = 0.9999,
    logits_tolerance: float | None = None,
) -> ValidationResult:
    """Compare PyTorch and ONNX Runtime on `inputs`; raise ExportValidationError past tolerance."""
    stats = compare_outputs(torch_outputs(model, part, inputs), onnx_outputs(onnx_path, part, inputs))
    result = summarize(stats, tolerance=tolerance, min_cosine=min_cosine, logits_tolerance=logits_tolerance)
    return raise_unless_ok(result, Path(onnx_path).name)


def validate_export(
    model: Any, onnx_path: str | Path, inputs: dict[str, Any], *, tolerance: float = 1e-4
) -> ValidationResult:
    """The whole model: run the same inputs through PyTorch and ONNX Runtime and compare every output."""
    return validate_part(model, get_part("model", family_for(model)), onnx_path, inputs, tolerance=tolerance)
