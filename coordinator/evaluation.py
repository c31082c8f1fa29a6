"""Server-side evaluation of a global adapter on held-out data (zero-shot against class prompts)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flora.data.datasets import LabeledImages, pixel_values
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, set_adapter_state
from flora.modeling.loading import LoadedClip
from flora.modeling.recipes import LoraRecipe


class Evaluator:
    """Owns the coordinator's PEFT model: evaluates adapters and saves them as PEFT directories."""

    def __init__(self, clip: LoadedClip, recipe: LoraRecipe, data: LabeledImages | None, *, template: str, seed: int):
        self.clip = clip
        self.model = attach_lora(clip.model, recipe, seed=seed)
        self.data = data
        self.template = template
        self.pixels = pixel_values(clip.image_processor, data.images).to(clip.device) if data else None

    def initial_adapter(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in get_adapter_state(self.model).items()}

    def load(self, tensors: dict[str, Any]) -> None:
        import torch

        set_adapter_state(self.model, {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()})

    def evaluate(self, tensors: dict[str, Any]) -> dict[str, float] | None:
        self.load(tensors)
        if self.data is None:
            return None
        prompts = scoring.class_prompts(self.data.class_names, self.template)
        return scoring.evaluate(self.model, self.clip.tokenizer, self.pixels, self.data.labels, prompts)
