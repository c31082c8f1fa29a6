"""CLIP embeddings, zero-shot logits against class prompts, accuracy, and the contrastive loss.

Every role scores the same way: the coordinator's evaluation, the client's local metrics and
the export's parity check all call these functions, so their numbers are comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

DEFAULT_TEMPLATE = "a photo of a {label}."


def class_prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    return [template.format(label=label) for label in labels]


def tokenize(tokenizer: Any, texts: Sequence[str], device: str = "cpu") -> dict[str, Any]:
    enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _normalize(x):
    return x / x.norm(p=2, dim=-1, keepdim=True)


def text_embeddings(model: Any, text_inputs: dict[str, Any]):
    """L2-normalised projected text embeddings (transformers 5 returns an output object)."""
    out = model.get_text_features(**text_inputs)
    return _normalize(out.pooler_output.float())


def image_embeddings(model: Any, pixel_values):
    """L2-normalised projected image embeddings."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    out = model.get_image_features(pixel_values=pixel_values.to(dtype))
    return _normalize(out.pooler_output.float())


def logit_scale(model: Any):
    return model.logit_scale.exp().float()


def contrastive_loss(image_embeds, text_embeds, targets, scale):
    """CLIP's symmetric loss when several images share a prompt.

    `text_embeds` holds each distinct prompt once (encoded once per step, not once per image);
    `targets[i]` is the prompt index of image i. Image->text is plain cross-entropy. Text->image
    spreads each prompt's target uniformly over the images that carry it. With all-distinct
    prompts this is exactly CLIP's loss.
    """
    import torch
    import torch.nn.functional as F

    logits_per_image = scale * image_embeds @ text_embeds.t()  # [images, prompts]
    loss_images = F.cross_entropy(logits_per_image, targets)
    one_hot = F.one_hot(targets, num_classes=text_embeds.shape[0]).t().float()  # [prompts, images]
    present = one_hot.sum(dim=1) > 0
    text_targets = one_hot[present] / one_hot[present].sum(dim=1, keepdim=True)
    log_probs = torch.log_softmax(logits_per_image.t()[present], dim=1)
    loss_texts = -(text_targets * log_probs).sum(dim=1).mean()
    return (loss_images + loss_texts) / 2


def zero_shot_logits(model: Any, pixel_values, text_inputs, *, batch_size: int = 256):
    """Logits of every image against every prompt, as `logits_per_image` of CLIPModel."""
    import torch

    with torch.no_grad():
        texts = text_embeddings(model, text_inputs)
        chunks = [
            image_embeddings(model, pixel_values[i : i + batch_size])
            for i in range(0, pixel_values.shape[0], batch_size)
        ]
        images = torch.cat(chunks)
        return logit_scale(model) * images @ texts.t()


def evaluate(model: Any, tokenizer: Any, pixel_values, labels, prompts: Sequence[str]) -> dict[str, float]:
    """Zero-shot top-1 accuracy and cross-entropy of images against the class prompts."""
    import torch
    import torch.nn.functional as F

    device = pixel_values.device
    was_training = model.training
    model.eval()
    try:
        logits = zero_shot_logits(model, pixel_values, tokenize(tokenizer, prompts, str(device)))
    finally:
        model.train(was_training)
    labels = torch.as_tensor(labels, device=logits.device)
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    return {"accuracy": accuracy, "loss": loss, "examples": int(labels.shape[0])}
