"""Computing the image embeddings of a frozen vision tower: batched, without autograd, at the chosen precision.

Precisions (`cache_precision`, client setting):
- "float32": the tower as loaded, exactly the embeddings a training step would compute.
- "autocast": under the trainer's autocast dtype (bfloat16, or float16 where bf16 is missing, on CUDA): the
  tensor cores' speed; what the trainer already used there.
- "int8": on CPU, the tower's Linear layers dynamically quantized to int8 (PyTorch's fbgemm/x86 kernels,
  weights per tensor, activations per batch), for an unquantized base. On the ViT-B/32 benchmark it built the
  cache 1.5-1.7x faster with embeddings at cosine >= 0.9997 to fp32, and the trained model's accuracy after
  a round within 0.5 point (BENCHMARKS.md). Opt-in: measured on our models, not on every checkpoint; and it
  rests on PyTorch's eager dynamic quantization, which PyTorch now marks deprecated in favour of torchao.
- "auto": "autocast" where the trainer autocasts (CUDA), else "float32" (CPUs without bf16 kernels run
  bf16 several times slower than fp32; we measured 4x on the AVX2 benchmark machine).

The precision is part of the cache's model fingerprint, so rows of one precision never mix with another's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence
from typing import Any

from edge_client.memory_budget import PeakMemoryMeter, images_per_chunk
from flora.data.datasets import pixel_values
from flora.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_PRECISIONS = ("auto", "float32", "autocast", "int8")


def resolve_cache_precision(mode: str, *, device: str, autocast_dtype: Any, quantized: bool) -> str:
    """The precision `mode` means on this device and base (never "auto")."""
    if mode not in CACHE_PRECISIONS:
        raise ConfigError(f"cache_precision must be one of {', '.join(CACHE_PRECISIONS)}, got {mode!r}")
    if mode == "auto":
        return "autocast" if autocast_dtype is not None else "float32"
    if mode == "autocast" and autocast_dtype is None:
        raise ConfigError("cache_precision = 'autocast' needs autocast on (a CUDA device, or autocast set)")
    if mode == "int8" and (device != "cpu" or quantized):
        raise ConfigError(
            "cache_precision = 'int8' is for an unquantized base on CPU; use 'auto' on CUDA or a quantized base"
        )
    return mode


@contextlib.contextmanager
def int8_vision_tower(model: Any, *, in_place: bool):
    """While inside: the vision tower's Linear layers dynamically quantized to int8.

    A quantized copy stands in for the tower and the original goes back afterwards; with `in_place` the tower
    itself is converted (no second copy in memory) and stays so: for a caller that releases it next.
    """
    import warnings

    import torch

    with warnings.catch_warnings():
        # PyTorch points eager dynamic quantization and quantized tensors to torchao (not a dependency): both
        # still ship and work; if a release drops them, this precision says so in one line (below).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            raise ConfigError(
                "cache_precision = 'int8' needs torch.ao.quantization, which this PyTorch lacks; set it to 'float32'"
            ) from None
        base = getattr(model, "get_base_model", lambda: model)()
        original = base.vision_model
        tower = original if in_place else copy.deepcopy(original)
        weights = [m.weight for m in tower.modules() if isinstance(m, torch.nn.Linear)] if in_place else []
        base.vision_model = quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    if weights:
        # The float weights the int8 layers replaced may be views of the mapped checkpoint, whose pages would
        # stay resident after the release (it drops only what the module still holds): drop them now.
        from flora.modeling.residency import drop_mapped_pages

        drop_mapped_pages(weights)
        del weights
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
            yield
    finally:
        if not in_place:
            base.vision_model = original


def embed_images(
    clip: Any,
    model: Any,
    images: Sequence[Any],
    *,
    precision: str,
    autocast_dtype: Any = None,
    chunk: int = 64,
    memory_budget_mb: float | None = None,
    discard_tower_after: bool = False,
) -> Any:
    """[len(images), D] fp32 normalised embeddings of `images`, `chunk` at a time, under inference_mode.

    `memory_budget_mb` (the process peak, as the training plan reads it): the first image is embedded alone
    and measured, and the chunk shrunk so that the rest stay within the budget; a large tower's activations
    (~60 MB an image on ViT-L/14 in 4-bit) would otherwise make the build, not training, the device's peak.

    `discard_tower_after`: the caller releases the tower afterwards, so the int8 precision may quantize it
    in place instead of copying it (no second copy in memory; the restored tower is the checkpoint's again).
    """
    import torch

    family, device = clip.family, clip.device
    tower = int8_vision_tower(model, in_place=discard_tower_after) if precision == "int8" else contextlib.nullcontext()
    if precision == "autocast":
        cast = torch.autocast(device_type=device.split(":")[0], dtype=autocast_dtype)
    else:
        cast = contextlib.nullcontext()
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.inference_mode(), tower:

            def embed(batch):
                pixels = pixel_values(clip.image_processor, batch).to(device)
                with cast:
                    return family.image_embeddings(model, pixels).float()

            first = 0
            if memory_budget_mb is not None and len(images) > 1:
                meter = PeakMemoryMeter(device)
                meter.reset()
                in_use = meter.current_mb()
                parts.append(embed(images[:1]))
                chunk = images_per_chunk(memory_budget_mb, in_use, meter.peak_mb() - in_use, chunk)
                log.info("image embeddings: %d images a chunk within memory_budget_mb = %g", chunk, memory_budget_mb)
                first = 1
            for start in range(first, len(images), chunk):
                parts.append(embed(images[start : start + chunk]))
    finally:
        model.train(was_training)
    # Out of inference mode: these rows are used by steps that build graphs (an inference tensor cannot be).
    return torch.cat(parts).clone() if parts else torch.empty(0)
