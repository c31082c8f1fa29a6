"""Load the base model for training with the configured quantization, or fall back without it.

A quantized base needs bitsandbytes kernels that run on this device. A Jetson wheel built without
the Orin's sm_87 imports fine and fails at the first matmul, so the decision rests on the capability
probe (a real quantized forward pass), and on the load itself. If either fails: with
`quantization_fallback` (the default) a warning names the cause and training goes on with an
unquantized base and LoRA (half precision on a GPU, to stay near the memory the user planned for);
without it, the agent refuses to start and says what to change.
"""

from __future__ import annotations

import logging

from edge_client import capabilities
from edge_client.config import ClientConfig
from flora.errors import ConfigError
from flora.modeling.loading import LoadedClip, load_clip, resolve_device

log = logging.getLogger(__name__)


def _half_dtype() -> str:
    import torch

    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_for_training(config: ClientConfig) -> LoadedClip:
    """The CLIP model to train; `.quantization` on the result is the quantization actually in effect."""
    device = resolve_device(config.device)
    wanted = config.quantization
    compute_dtype = config.compute_dtype
    if wanted == "none":
        return load_clip(config.model, quantization="none", compute_dtype=compute_dtype, device=device)
    if device.startswith("cuda") and compute_dtype == "float32" and config.autocast != "off":
        # 4-bit layers compute in their compute dtype; matching autocast's avoids a cast per layer.
        compute_dtype = _half_dtype() if config.autocast == "auto" else config.autocast
    problem = capabilities.quantization_problem(wanted, device)
    if problem is None:
        try:
            return load_clip(config.model, quantization=wanted, compute_dtype=compute_dtype, device=device)
        except ConfigError:
            raise  # the checkpoint itself cannot be found: falling back would not help
        except Exception as exc:  # bitsandbytes and accelerate raise RuntimeError, ValueError, ImportError...
            problem = f"loading {config.model!r} with quantization = {wanted!r} failed: {type(exc).__name__}: {exc}"
    if not config.quantization_fallback:
        raise ConfigError(
            f"quantization = {wanted!r} cannot be used on {device}: {problem}. Set quantization = 'none', or "
            "quantization_fallback = true to train an unquantized base instead, or install a bitsandbytes built "
            "for this device (docs/EDGE.md, troubleshooting)."
        )
    fallback_dtype = config.compute_dtype
    if device.startswith("cuda") and fallback_dtype == "float32":
        fallback_dtype = _half_dtype()
    log.warning(
        "quantization = %r is not available on %s: %s. Falling back to an unquantized %s base with LoRA "
        "(it needs more memory; set quantization_fallback = false to refuse instead).",
        wanted,
        device,
        problem,
        fallback_dtype,
    )
    return load_clip(config.model, quantization="none", compute_dtype=fallback_dtype, device=device)
