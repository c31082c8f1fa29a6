"""Inputs to trace and validate an export with: random tensors, and real processed images and prompts.

Validation sets use other batch sizes and sequence lengths than the trace, and mix padded and
unpadded prompts, so a graph that baked in a shape or skipped the attention mask fails them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flora.data.datasets import pixel_values
from flora.modeling.loading import LoadedClip


def trace_sample(clip: LoadedClip, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, Any]:
    """Two prompts of different lengths (so the trace sees padding) and two images."""
    longer = f"{prompts[0]} {prompts[-1]}"
    return {
        **clip.family.tokenize(clip.tokenizer, [prompts[0], longer]),
        "pixel_values": pixel_values(clip.image_processor, images[:2]),
    }


def real_inputs(clip: LoadedClip, prompts: Sequence[str], images: Sequence[Any]) -> dict[str, Any]:
    """Processed images and tokenized prompts, through the checkpoint's own processor."""
    return {
        **clip.family.tokenize(clip.tokenizer, prompts),
        "pixel_values": pixel_values(clip.image_processor, images),
    }


def random_inputs(clip: LoadedClip, *, images: int = 5, texts: int = 3, seed: int = 0) -> dict[str, Any]:
    """Gaussian pixel tensors and random token ids of varying length, bracketed by BOS (if any)/EOS and padded.

    Holds every text input a family may take (input_ids, attention_mask); each part reads the ones it declares.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    vision, text = clip.model.config.vision_config, clip.model.config.text_config
    pixels = torch.randn(images, 3, vision.image_size, vision.image_size, generator=generator)
    tok = clip.tokenizer
    special = {i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None}
    # Keep ids below the special tokens when they come last (CLIP): checkpoints with the legacy
    # eos_token_id pool at argmax(input_ids), which must land on the real end-of-text token. A
    # vocabulary with its special tokens first (SigLIP) draws from the ids above them.
    low, top = (
        (0, min(text.vocab_size, *special))
        if min(special) > text.vocab_size // 2
        else (max(special) + 1, text.vocab_size)
    )
    max_len = min(16, text.max_position_embeddings)
    rng = np.random.default_rng(seed)
    lengths = [max_len] + [int(n) for n in rng.integers(3, max_len, size=texts - 1)]
    ids = torch.full((texts, max_len), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((texts, max_len), dtype=torch.long)
    for row, length in enumerate(lengths):
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        body = torch.randint(low, top, (length - 1 - len(bos),), generator=generator)
        ids[row, :length] = torch.cat([torch.tensor(bos, dtype=torch.long), body, torch.tensor([tok.eos_token_id])])
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def synthetic_images(count: int, size: int = 40, seed: int = 0) -> list[Any]:
    """Random RGB images, for exports run without --eval-data."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
