"""Zero-shot evaluation of exported files with ONNX Runtime, run the way a device runs them.

ONNX Runtime inputs go through the torch-free path (export/preprocess.py, export/tokenizer.py),
so these figures also check that path against PyTorch fed by transformers' own processor.
A tower is scored with the other side taken from PyTorch fp32: the vision tower against the
zero-shot head, the text tower against PyTorch's image embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.preprocess import ImagePreprocessor
from export.quality import accuracy, top1_agreement
from export.runtime import OnnxClip
from export.zero_shot import ZeroShotHead, class_prompts
from flora.data.datasets import pixel_values
from flora.modeling.families import CLIP, ModelFamily
from flora.modeling.loading import LoadedClip


@dataclass
class ScoringSet:
    images: list[Any]
    labels: np.ndarray | None  # None: unlabelled (synthetic images); agreement only, no accuracy
    class_names: list[str]
    prompt_template: str
    description: str

    @property
    def prompts(self) -> list[str]:
        return class_prompts(self.class_names, self.prompt_template)


@dataclass
class TorchReference:
    """PyTorch fp32 embeddings of the scoring set: the yardstick for every file."""

    image_embeds: np.ndarray
    text_embeds: np.ndarray
    logit_scale: float
    logit_bias: float = 0.0  # SigLIP's; CLIP has none

    @property
    def logits(self) -> np.ndarray:
        return self.logits_against(self.text_embeds)

    def logits_against(self, text_embeds: np.ndarray) -> np.ndarray:
        return self.logit_scale * self.image_embeds @ text_embeds.T + self.logit_bias

    @classmethod
    def compute(cls, clip: LoadedClip, data: ScoringSet, *, batch_size: int = 256) -> TorchReference:
        import torch

        family = clip.family
        with torch.no_grad():
            # Preprocess a batch at a time: a large eval set as one pixel tensor would not fit in memory.
            images = [
                family.image_embeddings(clip.model, pixel_values(clip.image_processor, data.images[i : i + batch_size]))
                for i in range(0, len(data.images), batch_size)
            ]
            scale, bias = _logit_params(clip)
        return cls(torch.cat(images).numpy(), torch_text_embeddings(clip, data.prompts), scale, bias)

    def head(self, data: ScoringSet, info: dict[str, Any] | None = None) -> ZeroShotHead:
        return ZeroShotHead(
            list(data.class_names),
            self.text_embeds,
            self.logit_scale,
            data.prompt_template,
            info or {},
            self.logit_bias,
        )


def _logit_params(clip: LoadedClip) -> tuple[float, float]:
    """(exp'd logit scale, logit bias or 0.0) of the merged model, as plain floats."""
    import torch

    with torch.no_grad():
        bias = clip.family.logit_bias(clip.model)
        return float(clip.family.logit_scale(clip.model)), 0.0 if bias is None else float(bias)


def torch_text_embeddings(clip: LoadedClip, prompts: Sequence[str]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return clip.family.text_embeddings(clip.model, clip.family.tokenize(clip.tokenizer, prompts)).numpy()


def build_head(clip: LoadedClip, labels: Sequence[str], template: str, info: dict[str, Any]) -> ZeroShotHead:
    """The zero-shot head of `labels`, embedded by the merged PyTorch model (the fp32 reference)."""
    scale, bias = _logit_params(clip)
    embeds = torch_text_embeddings(clip, class_prompts(labels, template))
    return ZeroShotHead(list(labels), embeds, scale, template, info, bias)


def onnx_logits(
    part: str,
    path: Path,
    staging: Path,
    data: ScoringSet,
    reference: TorchReference,
    max_text_length: int | None,
    family: ModelFamily = CLIP,
) -> np.ndarray:
    """logits_per_image [images, classes] with `part` run by ONNX Runtime from `path`."""
    runner = OnnxClip(
        {part: path},
        ImagePreprocessor.from_dir(staging, family),
        logit_scale=reference.logit_scale,
        logit_bias=reference.logit_bias,
        family=family,
        tokenizer_dir=staging,
        max_text_length=max_text_length,
        head=reference.head(data) if part == "vision" else None,
        announce=False,
    )
    if part == "text":
        return reference.logits_against(runner.text_embeddings(data.prompts))
    _, logits = runner.logits(data.images, data.class_names, data.prompt_template, batch_size=256)
    return logits


def score(
    logits: np.ndarray, data: ScoringSet, *, fp32_logits: np.ndarray | None, torch_logits: np.ndarray
) -> dict[str, Any]:
    """Accuracy (if labelled), difference from PyTorch, and top-1 agreement with PyTorch and with fp32."""
    result: dict[str, Any] = {"examples": len(data.images), "on": data.description}
    if data.labels is not None:
        result["accuracy"] = accuracy(logits, data.labels)
    result["max_abs_diff_vs_pytorch"] = float(np.abs(logits - torch_logits).max())
    result["agreement_with_pytorch"] = top1_agreement(logits, torch_logits)
    if fp32_logits is not None:
        result["agreement_with_fp32"] = top1_agreement(logits, fp32_logits)
    return result


def labels_for(names: Sequence[str] | None, eval_names: Sequence[str] | None) -> list[str] | None:
    """The label set of the zero-shot head: given labels first, else the eval data's classes."""
    if names:
        return list(names)
    return list(eval_names) if eval_names else None
