"""Embeddings, zero-shot logits against class prompts, accuracy, and the training loss, for any family.

Every role scores the same way: the coordinator's evaluation, the client's local metrics and
the export's parity check all call these functions, so their numbers are comparable. What differs
between families (CLIP's scaled cosine, SigLIP's added bias and sigmoid loss, how text is padded)
is the family's (flora.modeling.families); these functions find it from the model's config.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flora.modeling.families import CLIP, family_for

DEFAULT_TEMPLATE = "a photo of a {label}."


def class_prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    return [template.format(label=label) for label in labels]


def tokenize(tokenizer: Any, texts: Sequence[str], device: str = "cpu", *, family=CLIP) -> dict[str, Any]:
    """The text inputs `family`'s model takes (CLIP: padded to the longest prompt, with attention mask)."""
    return family.tokenize(tokenizer, texts, device)


def text_embeddings(model: Any, text_inputs: dict[str, Any]):
    """L2-normalised projected text embeddings, fp32."""
    return family_for(model).text_embeddings(model, text_inputs)


def image_embeddings(model: Any, pixel_values):
    """L2-normalised projected image embeddings, fp32."""
    return family_for(model).image_embeddings(model, pixel_values)


def logit_scale(model: Any):
    return family_for(model).logit_scale(model)


def logit_bias(model: Any):
    """The family's additive logit bias (SigLIP), or None (CLIP)."""
    return family_for(model).logit_bias(model)


def contrastive_loss(image_embeds, text_embeds, targets, scale):
    """CLIP's symmetric loss (kept for callers of the CLIP-only API); see ClipFamily.loss."""
    return CLIP.loss(image_embeds, text_embeds, targets, scale)


def zero_shot_logits(model: Any, pixel_values, text_inputs, *, batch_size: int = 256):
    """Logits of every image against every prompt, as the model's `logits_per_image`."""
    import torch

    family = family_for(model)
    with torch.no_grad():
        texts = family.text_embeddings(model, text_inputs)
        chunks = [
            family.image_embeddings(model, pixel_values[i : i + batch_size])
            for i in range(0, pixel_values.shape[0], batch_size)
        ]
        images = torch.cat(chunks)
        return family.logits(images, texts, family.logit_scale(model), family.logit_bias(model))


def evaluate(model: Any, tokenizer: Any, pixel_values, labels, prompts: Sequence[str]) -> dict[str, float]:
    """Zero-shot top-1 accuracy and cross-entropy of images against the class prompts."""
    import torch
    import torch.nn.functional as F

    device = pixel_values.device
    was_training = model.training
    model.eval()
    try:
        text_inputs = tokenize(tokenizer, prompts, str(device), family=family_for(model))
        logits = zero_shot_logits(model, pixel_values, text_inputs)
    finally:
        model.train(was_training)
    labels = torch.as_tensor(labels, device=logits.device)
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    return {"accuracy": accuracy, "loss": loss, "examples": int(labels.shape[0])}
