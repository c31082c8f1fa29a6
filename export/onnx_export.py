"""Export a (merged) CLIPModel to ONNX with torch.onnx.export, then validate it against PyTorch.

Names follow the Hugging Face / optimum conventions: inputs input_ids, attention_mask,
pixel_values; outputs logits_per_image, logits_per_text, text_embeds, image_embeds. Batch and
sequence axes are dynamic. We use the TorchScript exporter (dynamo=False): it traces CLIP
without needing onnxscript and produces a graph ONNX Runtime runs on CPU, CUDA and TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flora import __version__
from flora.errors import FloraError

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAMES = ["input_ids", "attention_mask", "pixel_values"]
OUTPUT_NAMES = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
DYNAMIC_AXES = {
    "input_ids": {0: "text_batch", 1: "sequence"},
    "attention_mask": {0: "text_batch", 1: "sequence"},
    "pixel_values": {0: "image_batch"},
    "logits_per_image": {0: "image_batch", 1: "text_batch"},
    "logits_per_text": {0: "text_batch", 1: "image_batch"},
    "text_embeds": {0: "text_batch"},
    "image_embeds": {0: "image_batch"},
}


class ExportValidationError(FloraError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance: the export must not be trusted."""


@dataclass
class ValidationResult:
    max_abs_diff: float
    min_cosine: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _clip_wrapper(model: Any):
    import torch

    class ClipForOnnx(torch.nn.Module):
        """Returns a plain tuple in OUTPUT_NAMES order (ONNX wants tensors, not output objects)."""

        def __init__(self, clip_model):
            super().__init__()
            self.clip = clip_model

        def forward(self, input_ids, attention_mask, pixel_values):
            out = self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
            return out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds

    return ClipForOnnx(model).eval()


def export_clip(
    model: Any, sample: dict[str, Any], path: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write the whole CLIP model to `path` (a .onnx file), with metadata in the model's properties."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    # The tracer warns about Python-side shape checks in transformers' CLIP; the dynamic-axes
    # validation below is what proves the graph generalises, so the warnings are noise here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _clip_wrapper(model),
            tuple(sample[name] for name in INPUT_NAMES),
            str(tmp),
            dynamo=False,
            input_names=INPUT_NAMES,
            output_names=OUTPUT_NAMES,
            dynamic_axes=DYNAMIC_AXES,
            opset_version=OPSET,
        )
    proto = onnx.load(str(tmp))
    for key, value in {"flora_version": __version__, **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    return path


def validate_export(
    model: Any, onnx_path: str | Path, inputs: dict[str, Any], *, tolerance: float = 1e-4
) -> ValidationResult:
    """Run the same inputs through PyTorch and ONNX Runtime and compare every output."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = _clip_wrapper(model)(*(inputs[name] for name in INPUT_NAMES))
    got = session.run(OUTPUT_NAMES, {name: inputs[name].numpy() for name in INPUT_NAMES})
    max_diff, min_cos = 0.0, 1.0
    for ref, out in zip(reference, got):
        ref = ref.numpy()
        max_diff = max(max_diff, float(np.abs(ref - out).max()))
        a, b = ref.reshape(ref.shape[0], -1), out.reshape(out.shape[0], -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        min_cos = min(min_cos, float(cos.min()))
    result = ValidationResult(max_diff, min_cos, tolerance)
    if not result.ok:
        raise ExportValidationError(
            f"ONNX Runtime differs from PyTorch by {max_diff:.3g} (tolerance {tolerance:g}); do not deploy this export"
        )
    return result


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_metadata(base: str, adapter_dir: Path) -> dict[str, str]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {
        "base_model": base,
        "adapter_sha256": file_sha256(adapter_dir / "adapter_model.safetensors"),
        "lora_rank": str(config.get("r")),
        "lora_alpha": str(config.get("lora_alpha")),
        "lora_target_modules": json.dumps(config.get("target_modules")),
    }
