"""`flora export`: merge, export, validate, and (given labelled data) score with ONNX Runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from export.evaluate import accuracy, onnx_zero_shot_logits
from export.merge import merge_adapter
from export.onnx_export import export_clip, export_metadata, validate_export
from flora.data.datasets import LabeledImages, pixel_values
from flora.modeling import scoring

log = logging.getLogger(__name__)


def export_and_validate(
    base: str,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    eval_data: LabeledImages | None = None,
    prompt_template: str = scoring.DEFAULT_TEMPLATE,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    clip = merge_adapter(base, adapter_dir)
    tokenizer, processor = clip.tokenizer, clip.image_processor
    labels = eval_data.class_names if eval_data else ["cat", "dog"]
    prompts = scoring.class_prompts(labels, prompt_template)
    sample_images = eval_data.images[:4] if eval_data else _random_images(4)
    inputs = {**scoring.tokenize(tokenizer, prompts), "pixel_values": pixel_values(processor, sample_images)}

    onnx_path = export_clip(clip.model, inputs, out_dir / "model.onnx", metadata=export_metadata(base, adapter_dir))
    clip.processor.save_pretrained(out_dir)  # tokenizer + image processor beside the model
    # Validate on different batch sizes than the trace used, to prove the axes are dynamic.
    check = {**scoring.tokenize(tokenizer, prompts[:3]), "pixel_values": pixel_values(processor, _random_images(5))}
    validation = validate_export(clip.model, onnx_path, check, tolerance=tolerance)
    result: dict[str, Any] = {
        "path": str(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "max_abs_diff": validation.max_abs_diff,
        "min_cosine": validation.min_cosine,
        "tolerance": tolerance,
    }
    if eval_data is not None:
        ort_logits = onnx_zero_shot_logits(onnx_path, tokenizer, processor, eval_data.images, prompts)
        torch_logits = scoring.zero_shot_logits(
            clip.model, pixel_values(processor, eval_data.images), scoring.tokenize(tokenizer, prompts)
        ).numpy()
        result.update(
            onnxruntime_accuracy=accuracy(ort_logits, eval_data.labels),
            pytorch_accuracy=accuracy(torch_logits, eval_data.labels),
            test_max_abs_diff=float(abs(ort_logits - torch_logits).max()),
            test_examples=len(eval_data),
        )
    log.info("exported %s (max abs diff %.2e)", onnx_path, validation.max_abs_diff)
    return result


def _random_images(count: int, size: int = 40, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
