"""CLIP (Radford et al., 2021): logits = exp(logit_scale) * cosine, trained with a symmetric softmax loss."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from flora.modeling.families.base import ModelFamily, register_family


class ClipFamily(ModelFamily):
    name = "clip"
    model_types = ("clip",)
    model_class_name = "CLIPModel"
    image_path_modules = ("vision_model", "visual_projection")
    text_input_names = ("input_ids", "attention_mask")
    text_padding = "longest"  # the text tower pools at the end-of-text token, wherever it is
    # transformers' CLIPImageProcessor defaults (OpenAI's statistics, shortest edge 224, center crop).
    preprocessing_defaults: ClassVar[dict] = {
        "size": {"shortest_edge": 224},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "resample": 3,  # bicubic
        "image_mean": (0.48145466, 0.4578275, 0.40821073),
        "image_std": (0.26862954, 0.26130258, 0.27577711),
    }

    def loss(self, image_embeds, text_embeds, targets, scale, bias=None):
        """CLIP's symmetric loss when several images share a prompt.

        Image->text is plain cross-entropy. Text->image spreads each prompt's target uniformly over the
        images that carry it. With all-distinct prompts this is exactly CLIP's loss.
        """
        import torch
        import torch.nn.functional as F

        logits_per_image = self.logits(image_embeds, text_embeds, scale, bias)  # [images, prompts]
        loss_images = F.cross_entropy(logits_per_image, targets)
        one_hot = F.one_hot(targets, num_classes=text_embeds.shape[0]).t().float()  # [prompts, images]
        present = one_hot.sum(dim=1) > 0
        text_targets = one_hot[present] / one_hot[present].sum(dim=1, keepdim=True)
        log_probs = torch.log_softmax(logits_per_image.t()[present], dim=1)
        loss_texts = -(text_targets * log_probs).sum(dim=1).mean()
        return (loss_images + loss_texts) / 2

    def write_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from flora.modeling.tiny import write_tiny_clip

        return write_tiny_clip(out_dir, seed=seed)


CLIP = register_family(ClipFamily())
