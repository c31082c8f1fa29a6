"""Training on a quantized (bitsandbytes 4-bit / 8-bit) base, and activation checkpointing.

`prepare_quantized_for_training` is peft's `prepare_model_for_kbit_training` with gradient
checkpointing left to `set_activation_checkpointing`: peft's default enables *reentrant*
checkpointing, which PyTorch now warns about (and will refuse) and which needs every
checkpointed input to require grad. The non-reentrant kind gives the same gradients with neither
caveat, so we switch it on ourselves, only when the memory budget needs it.
"""

from __future__ import annotations

from typing import Any


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized_for_training(model: Any) -> Any:
    """Freeze the base and cast its non-quantized floating parameters to fp32 (LayerNorms, embeddings).

    A no-op for a model that is not quantized. Call it before `attach_lora`.
    """
    if not is_quantized(model):
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def set_activation_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (non-reentrant).

    `model` is the transformers CLIPModel (under a PeftModel: `peft_model.base_model.model`). It only
    acts in training mode, as transformers checkpoints layers only while `model.training`.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if enabled:
        enable({"use_reentrant": False})
    else:
        disable()


def activation_checkpointing_enabled(model: Any) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def release_checkpoint_file(model: Any) -> int:
    """Give the CPU tensors that still view the checkpoint's memory-mapped file memory of their own.

    transformers loads safetensors through a memory map, and the parameters it does not quantize
    (embeddings, LayerNorms, projections) stay views into it: after quantizing, which read every
    page of the file, the whole full-precision file then stays mapped and resident (ViT-B/32: 600 MB
    more than the 4-bit model needs). Copying those few tensors lets the map go. Quantized weights are
    already copies. Returns the number of tensors copied. Only a load through the map needs it (a .bin, an
    already quantized checkpoint): the toolkit's streamed load (flora/modeling/streamed.py) maps nothing.
    """
    import torch

    copied = 0
    with torch.no_grad():
        for module in model.modules():
            for param in list(module.parameters(recurse=False)):
                if param.device.type == "cpu" and type(param).__name__ not in ("Params4bit", "Int8Params"):
                    param.data = param.data.clone()
                    copied += 1
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.device.type == "cpu":
                    module._buffers[name] = buffer.clone()
                    copied += 1
    return copied
