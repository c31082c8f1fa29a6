"""Load any Hugging Face CLIPModel checkpoint (hub id or local directory), optionally quantized."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flora.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "8bit", "4bit")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class LoadedClip:
    model: Any  # transformers.CLIPModel (possibly with bitsandbytes layers)
    processor: Any  # transformers.CLIPProcessor: tokenizer + image processor
    name_or_path: str
    quantization: str
    device: str
    compute_dtype: str = "float32"  # bitsandbytes' compute dtype, or the weights' dtype when not quantized

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor


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


def load_clip(
    name_or_path: str | Path,
    *,
    quantization: str = "none",
    compute_dtype: str = "float32",
    device: str = "cpu",
) -> LoadedClip:
    """Load model and processor through `from_pretrained`, the same path for hub ids and local dirs."""
    from transformers import AutoProcessor, CLIPModel

    device = resolve_device(device)
    name = str(name_or_path)
    quant = quantization_config(quantization, compute_dtype)
    kwargs: dict[str, Any] = {}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device
    elif compute_dtype != "float32":
        kwargs["dtype"] = _torch_dtype(compute_dtype)
    try:
        model = CLIPModel.from_pretrained(name, **kwargs)
        processor = AutoProcessor.from_pretrained(name)
    except OSError as exc:
        raise ConfigError(
            f"cannot load CLIP checkpoint {name!r}: {exc}. Pass a local directory written by "
            "save_pretrained, or a hub id reachable from this machine."
        ) from None
    if quant is None:
        model.to(device)
    elif device == "cpu":
        from flora.modeling.kbit import release_checkpoint_file

        release_checkpoint_file(model)  # else the full-precision file stays mapped and resident
    model.eval()
    log.info("loaded %s (quantization=%s, device=%s)", name, quantization, device)
    return LoadedClip(
        model=model,
        processor=processor,
        name_or_path=name,
        quantization=quantization,
        device=device,
        compute_dtype=compute_dtype,
    )
