"""The 4-bit base the clients trained against, as a model ONNX can take: dequantized to fp32.

Clients with `quantization = "4bit"` train LoRA on top of NF4 weights, so the adapter learnt to
correct *those* weights, not the original ones. Merging into the original fp32 base is what the
design prescribes by default, but the fp32 model whose weights are exactly the NF4 values
(dequantized) reproduces training-time outputs more closely. A bitsandbytes model itself cannot
be exported to ONNX (its Linear4bit kernels have no ONNX form), hence the dequantized copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flora.errors import ConfigError
from flora.modeling.loading import LoadedClip, load_clip

log = logging.getLogger(__name__)


def load_4bit(base: str) -> LoadedClip:
    """The base as clients load it with quantization = "4bit" (NF4, double quantization, fp32 compute)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            "merging into the dequantized 4-bit base needs bitsandbytes (pip install 'flora-edge[edge]'); "
            "or use --merge-base original"
        ) from None
    return load_clip(base, quantization="4bit", device="cpu")


def dequantized_4bit_base(base: str, quantized: LoadedClip | None = None) -> LoadedClip:
    """An fp32 CLIPModel whose quantized Linear weights are replaced by their NF4-dequantized values."""
    import bitsandbytes as bnb
    import torch
    from bitsandbytes.functional import dequantize_4bit

    quantized = quantized or load_4bit(base)
    clip = load_clip(base, quantization="none", device="cpu")
    replaced = 0
    with torch.no_grad():
        for name, module in quantized.model.named_modules():
            if not isinstance(module, bnb.nn.Linear4bit):
                continue
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
            target = clip.model.get_submodule(name).weight
            if tuple(weight.shape) != tuple(target.shape):
                raise ConfigError(f"{name}: dequantized weight {tuple(weight.shape)} != base {tuple(target.shape)}")
            target.copy_(weight)
            replaced += 1
    if replaced == 0:
        raise ConfigError(f"{base}: no 4-bit layers found after loading with bitsandbytes; nothing to dequantize")
    log.info("dequantized %d 4-bit Linear layers of %s into fp32", replaced, base)
    clip.model.eval()
    return clip


def training_time_model(adapter_dir: str | Path, quantized: LoadedClip):
    """The model clients actually ran: the 4-bit base with the adapter attached, not merged."""
    from peft import PeftModel

    return PeftModel.from_pretrained(quantized.model, str(adapter_dir)).eval()
