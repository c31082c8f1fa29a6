"""Merge the federated adapter into the full-precision base and export ONNX for ONNX Runtime.

Public API (see docs/API.md); names are imported on first use, so `from export import run_infer`
needs no PyTorch on an inference-only device:

    result = export_and_validate(base, "ckpt/global_adapter", "model/", eval_data=data)   # ExportResult
    predictions = run_infer("model/", ["photos/"])
"""

from flora.lazy_exports import lazy_exports

_EXPORTS = {
    "export_and_validate": "export.pipeline",
    "ExportRecord": "export.records",
    "ExportResult": "export.records",
    "ExportValidationError": "export.onnx_export",
    "merge_adapter": "export.merge",
    "Manifest": "export.manifest",
    "OnnxClip": "export.runtime",
    "run_infer": "export.infer",
    "classify": "export.infer",
    "ZeroShotHead": "export.zero_shot",
    "read_labels": "export.zero_shot",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
