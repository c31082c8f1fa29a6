"""Load a checkpoint of any registered model family (hub id or local directory), optionally quantized.

The family (CLIP, SigLIP, ...) is detected from the checkpoint's config `model_type` and stays reachable
as `loaded.family`: every later step (scoring, training, caching, export) asks it what differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.errors import ConfigError
from flora.modeling.families import CLIP, ModelFamily, family_for
from flora.modeling.fingerprint import checkpoint_identity

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "8bit", "4bit")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoadedModel:
    model: Any  # the family's transformers model, e.g. CLIPModel (possibly with bitsandbytes layers)
    processor: Any  # the family's processor: tokenizer + image processor
    name_or_path: str
    quantization: str
    device: str
    compute_dtype: str = "float32"  # bitsandbytes' compute dtype, or the weights' dtype when not quantized
    family: ModelFamily = CLIP
    # The checkpoint files' identity as they were loaded (flora.modeling.fingerprint.checkpoint_identity), None
    # for a hub id not yet on disk or files that changed during the load: the image cache keys its memo by it.
    checkpoint_identity: dict | None = None

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor


LoadedClip = LoadedModel  # the name most of the toolkit was written against


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but PyTorch sees no CUDA device; set device = 'auto' or 'cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return device


def _torch_dtype(name: str):
    import torch

    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    return getattr(torch, name)


def quantization_config(quantization: str, compute_dtype: str = "float32"):
    """transformers' BitsAndBytesConfig for '8bit' or '4bit' (NF4), or None for 'none'."""
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_torch_dtype(compute_dtype),
    )


def _from_pretrained(family: ModelFamily, name: str, *, stream: bool, **kwargs: Any) -> tuple[Any, Any, bool]:
    """(model, processor, mapped): mapped when the weights came through transformers' memory map of the file.

    With `stream` (a quantized load) a safetensors checkpoint is read a tensor at a time, so the load peaks at
    the quantized model plus one float tensor, not plus the whole file (flora/modeling/streamed.py); a .bin or
    an already quantized checkpoint loads the ordinary way. An unquantized load keeps the map on purpose: its
    frozen weights stay views of the file, resident only where touched (flora/modeling/residency.py).
    """
    if stream:
        from transformers import AutoProcessor

        from flora.modeling.streamed import checkpoint_files, load_streamed

        files = checkpoint_files(name)
        try:
            model = load_streamed(family.model_class(), name, files, **kwargs) if files else None
        except Exception as exc:  # e.g. a transformers release that no longer takes lazy slices as a state_dict
            log.warning(
                "could not stream %s into from_pretrained (%s: %s); loading it through transformers' memory map "
                "instead, which holds the whole file at the load's peak",
                name,
                type(exc).__name__,
                exc,
            )
            model = None  # a fault of the checkpoint itself shows again, and is reported, by the ordinary load
        if model is not None:
            return model, AutoProcessor.from_pretrained(name), False
    return (*family.from_pretrained(name, **kwargs), True)


def load_model(
    name_or_path: str | Path,
    *,
    quantization: str = "none",
    compute_dtype: str = "float32",
    device: str = "cpu",
) -> LoadedModel:
    """Load model and processor through `from_pretrained`, the same path for hub ids and local dirs."""
    device = resolve_device(device)
    name = str(name_or_path)
    family = family_for(name)
    quant = quantization_config(quantization, compute_dtype)
    kwargs: dict[str, Any] = {}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device
    elif compute_dtype != "float32":
        kwargs["dtype"] = _torch_dtype(compute_dtype)
    identity = checkpoint_identity(name)  # before the load, and compared after it (below)
    try:
        model, processor, mapped = _from_pretrained(family, name, stream=quant is not None, **kwargs)
    except OSError as exc:
        raise ConfigError(
            f"cannot load checkpoint {name!r} ({family.name}): {exc}. Pass a local directory written by "
            "save_pretrained, or a hub id reachable from this machine."
        ) from None
    if quant is None:
        model.to(device)
    elif device == "cpu" and mapped:
        from flora.modeling.kbit import release_checkpoint_file

        release_checkpoint_file(model)  # else the full-precision file stays mapped and resident
    model.eval()
    log.info("loaded %s %s (quantization=%s, device=%s)", family.name, name, quantization, device)
    return LoadedModel(
        model=model,
        processor=processor,
        name_or_path=name,
        quantization=quantization,
        device=device,
        compute_dtype=compute_dtype,
        family=family,
        checkpoint_identity=identity if identity == checkpoint_identity(name) else None,
    )


load_clip = load_model  # the name most of the toolkit was written against
