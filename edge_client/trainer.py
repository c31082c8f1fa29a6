"""The local training loop: one round of LoRA training on this device's data.

Read it top to bottom: load the global adapter, run `local_epochs` of CLIP's contrastive loss
between each image and its class prompt, return the new adapter tensors and scalar metrics.
The optimizer is rebuilt every round (FedAvg's convention: client state does not leak across
rounds). Data is preprocessed once, when the trainer is built, and reused every round.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_client.capabilities import peak_rss_mb
from flora.data.datasets import LabeledImages, pixel_values
from flora.modeling import scoring
from flora.modeling.adapter import attach_lora, get_adapter_state, set_adapter_state
from flora.modeling.loading import LoadedClip
from flora.modeling.recipes import LoraRecipe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters the coordinator sends with each instruction (the paper's Adam settings)."""

    local_epochs: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    batch_size: int = 128
    prompt_template: str = scoring.DEFAULT_TEMPLATE
    proximal_mu: float = 0.0  # FedProx: (mu/2)||w - w_global||^2 keeps local training near the global adapter
    freeze_lora_a: bool = False  # FFA-LoRA: A stays at the shared initialisation; only B trains and travels

    @classmethod
    def from_instruction(cls, data: dict[str, Any]) -> TrainSettings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "betas" in known:
            known["betas"] = tuple(float(b) for b in known["betas"])
        settings = cls(**known)
        if (
            settings.local_epochs < 1
            or settings.batch_size < 1
            or not settings.learning_rate > 0
            or settings.proximal_mu < 0
        ):
            raise ValueError(f"invalid training settings from coordinator: {settings}")
        return settings


class LocalTrainer:
    def __init__(
        self,
        clip: LoadedClip,
        recipe: LoraRecipe,
        data: LabeledImages,
        *,
        seed: int = 0,
        max_batch_size: int = 128,
        progress: bool = True,
    ):
        import torch

        self.clip = clip
        self.recipe = recipe
        self.data = data
        self.seed = seed
        self.max_batch_size = max_batch_size
        self.progress = progress
        self.model = attach_lora(clip.model, recipe, seed=seed)
        self.pixels = pixel_values(clip.image_processor, data.images).to(clip.device)
        self.labels = torch.as_tensor(data.labels, device=clip.device)
        self._rounds_trained = 0

    @property
    def num_examples(self) -> int:
        return len(self.data)

    def adapter_state(self):
        return get_adapter_state(self.model)

    def train_round(self, global_adapter: dict[str, Any], settings: TrainSettings, round_: int):
        """Train from `global_adapter`; returns (new adapter tensors, metrics)."""
        import torch
        from tqdm import tqdm

        set_adapter_state(self.model, {k: torch.as_tensor(v) for k, v in global_adapter.items()})
        device = self.clip.device
        prompts = scoring.class_prompts(self.data.class_names, settings.prompt_template)
        prompt_inputs = scoring.tokenize(self.clip.tokenizer, prompts, device)
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                param.requires_grad = not (settings.freeze_lora_a and "lora_A" in name)
        params = [p for p in self.model.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
        optimizer = torch.optim.AdamW(
            params,
            lr=settings.learning_rate,
            betas=settings.betas,
            eps=settings.eps,
            weight_decay=settings.weight_decay,
        )
        batch_size = min(settings.batch_size, self.max_batch_size, self.num_examples)
        steps_per_epoch = math.ceil(self.num_examples / batch_size)
        rng = np.random.default_rng([self.seed, round_])
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.model.train()
        started = time.perf_counter()
        losses: list[float] = []
        bar = tqdm(
            total=settings.local_epochs * steps_per_epoch,
            desc=f"round {round_}",
            unit="step",
            # Only on a terminal: under systemd the bar's carriage returns garble journald's lines.
            disable=not (self.progress and sys.stderr.isatty()),
            leave=False,
        )
        for _epoch in range(settings.local_epochs):
            order = torch.as_tensor(rng.permutation(self.num_examples), device=device)
            for start in range(0, self.num_examples, batch_size):
                idx = order[start : start + batch_size]
                # Encode each distinct class prompt once per step, not once per image.
                classes, targets = torch.unique(self.labels[idx], return_inverse=True)
                text = scoring.text_embeddings(self.model, {k: v[classes] for k, v in prompt_inputs.items()})
                images = scoring.image_embeddings(self.model, self.pixels[idx])
                loss = scoring.contrastive_loss(images, text, targets, scoring.logit_scale(self.model))
                if anchors:
                    loss = loss + settings.proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"local loss became {loss.item()} in round {round_}; lower the learning rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        seconds = time.perf_counter() - started
        self._rounds_trained += 1
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else peak_rss_mb()
        metrics = {
            "num_examples": self.num_examples,
            "train_loss": float(np.mean(losses)),
            "train_loss_last": losses[-1],
            "steps": len(losses),
            "batch_size": batch_size,
            "seconds": seconds,
            "peak_memory_mb": peak,
            "peak_memory_kind": "cuda_max_allocated" if device.startswith("cuda") else "process_peak_rss",
        }
        tensors = self.adapter_state()
        if settings.freeze_lora_a:  # A is unchanged: send only B (half the bytes)
            tensors = {k: v for k, v in tensors.items() if "lora_A" not in k}
        return tensors, metrics
