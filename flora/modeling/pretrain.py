"""A starting point that is not random: the tiny CLIP pretrained on font-rendered digits, seeded and cached.

The paper adapts real CLIP weights; these machines cannot download them, and a random tiny CLIP has no features
for LoRA to adapt. So we pretrain the whole tiny CLIP (both towers) centrally on a related but different domain
made here (flora/data/rendered_digits.py: typeset digits), then federate on scikit-learn's handwritten digits.
The result is a plain `save_pretrained` directory (loads like any checkpoint), cached under a key of every
setting: the same settings reuse it, any change makes a new one. Kept small: about a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from flora.files import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the procedure changes: old cache entries are then not reused
TEMPLATE = "a photo of the digit {label}."


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    per_class: int = 200  # rendered images per digit
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    seed: int = 0

    def key(self) -> str:
        text = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("FLORA_CACHE_DIR") or Path.home() / ".cache" / "flora") / "pretrained"


def pretrained_digits_model(settings: PretrainSettings | None = None, *, cache_dir: Path | None = None) -> Path:
    """The checkpoint directory of the tiny CLIP pretrained with `settings`: from the cache, or made now."""
    settings = settings or PretrainSettings()
    path = (cache_dir or cache_root()) / f"rendered-digits-{settings.key()}"
    if (path / "pretrain.json").is_file():
        return path
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    info = pretrain(tmp, settings)
    atomic_write_json(tmp / "pretrain.json", info)  # last: a directory without it is not a finished entry
    if path.exists():  # another process finished the same settings meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
        return path
    tmp.rename(path)
    log.info("pretrained the tiny CLIP on rendered digits in %.0fs: %s", info["seconds"], path)
    return path


def pretrain(out_dir: Path, settings: PretrainSettings) -> dict:
    """Write a tiny CLIP to `out_dir`, train every weight with the class-prompt loss on rendered digits, save."""
    import numpy as np
    import torch

    from flora.data.datasets import pixel_values
    from flora.data.rendered_digits import rendered_digits
    from flora.modeling.loading import load_clip
    from flora.modeling.scoring import class_prompts
    from flora.modeling.tiny import write_tiny_clip

    started = time.perf_counter()
    write_tiny_clip(out_dir, seed=settings.seed)
    clip = load_clip(str(out_dir), device="cpu")
    model, family = clip.model, clip.family
    data = rendered_digits(settings.per_class, seed=settings.seed)
    pixels = pixel_values(clip.image_processor, data.images)
    labels = torch.as_tensor(data.labels)
    tokens = family.tokenize(clip.tokenizer, class_prompts(data.class_names, TEMPLATE), "cpu")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(data) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.learning_rate, total_steps=steps)
    model.train()
    losses = []
    for _epoch in range(settings.epochs):
        order = torch.as_tensor(rng.permutation(len(data)))
        for start in range(0, len(data), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            images = family.image_embeddings(model, pixels[idx])
            texts = family.text_embeddings(model, tokens)  # every class: the class-prompt objective
            loss = family.loss(images, texts, labels[idx], family.logit_scale(model))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    model.save_pretrained(str(out_dir))
    return {
        "settings": dataclasses.asdict(settings),
        "format": FORMAT,
        "domain": "digits rendered from Pillow's built-in font (flora/data/rendered_digits.py)",
        "prompt_template": TEMPLATE,
        "final_loss": float(np.mean(losses[-10:])),
        "seconds": time.perf_counter() - started,
    }
