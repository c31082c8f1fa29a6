"""Zero-shot evaluation of an exported model with ONNX Runtime alone (no PyTorch on this path)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def onnx_zero_shot_logits(
    onnx_path: str | Path,
    tokenizer: Any,
    image_processor: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    *,
    batch_size: int = 256,
) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    text = tokenizer(list(prompts), padding=True, return_tensors="np")
    chunks = []
    for start in range(0, len(images), batch_size):
        pixels = image_processor(images=list(images[start : start + batch_size]), return_tensors="np")["pixel_values"]
        (logits,) = session.run(
            ["logits_per_image"],
            {
                "input_ids": text["input_ids"].astype(np.int64),
                "attention_mask": text["attention_mask"].astype(np.int64),
                "pixel_values": np.asarray(pixels, dtype=np.float32),
            },
        )
        chunks.append(logits)
    return np.concatenate(chunks)


def accuracy(logits: np.ndarray, labels: Sequence[int]) -> float:
    return float((logits.argmax(axis=1) == np.asarray(labels)).mean())
