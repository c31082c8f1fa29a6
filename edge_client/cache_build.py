"""Computing the image embeddings of a frozen vision tower: batched, without autograd, at the chosen precision.

Precisions (`cache_precision`, client setting):
- "float32": the tower as loaded, exactly the embeddings a training step would compute.
- "autocast": under the trainer's autocast dtype (bfloat16, or float16 where bf16 is missing, on CUDA): the
  tensor cores' speed; what the trainer already used there.
- "bfloat16": on a CPU with bfloat16 matrix instructions (x86 AMX or AVX512-BF16: Intel Xeon Sapphire Rapids
  and later, AMD Zen 4 and later), the tower run under CPU autocast to bfloat16 (oneDNN's bf16 kernels; norms
  and softmax stay float32), for an unquantized base. On the ViT-B/32 benchmark (AMX Xeon) its forward pass
  ran 3.2x faster than float32 (the whole build, fingerprint and release included, 2.3x in CPU time), with
  embeddings at cosine >= 0.99999 (relative L2 error <= 0.5%: 5x closer than int8). Yet the trained model's
  accuracy after a round moves about as much as with int8 (a random error of the same size moved it less): on
  the demo task, median 0.28 point from float32 over 6 seeds, 0.84 at worst (BENCHMARKS.md). Opt-in, like int8.
  Refused on a CPU without those instructions, where bfloat16 is emulated and ~4x slower than float32.
- "int8": on CPU, the tower's Linear layers dynamically quantized to int8 (PyTorch's fbgemm/x86 kernels,
  weights per tensor, activations per batch), for an unquantized base. On the ViT-B/32 benchmark it built the
  cache 1.5-1.7x faster with embeddings at cosine >= 0.9997 to fp32, and the trained model's accuracy after
  a round 0.28 point from float32 (median; 0.56-0.84 at worst, BENCHMARKS.md). Opt-in: measured on our models,
  not on every checkpoint; and it rests on PyTorch's eager dynamic quantization, which PyTorch now marks
  deprecated in favour of torchao.
- "onnx-int8": on CPU, the tower run by ONNX Runtime as an int8 file built once per base model and kept beside
  the cache (edge_client/onnx_vision.py; U8S8 VNNI kernels where the CPU has them), for an unquantized base.
  The fastest CPU build (3.6x less CPU time than float32 on the ViT-B/32 benchmark without AMX); what it
  changes in the trained model's accuracy is measured in BENCHMARKS.md. Opt-in, like the two above.
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

CACHE_PRECISIONS = ("auto", "float32", "autocast", "bfloat16", "int8", "onnx-int8")


def cpu_has_bf16() -> bool:
    """Whether this CPU has the bfloat16 matrix instructions oneDNN's bf16 kernels use (AMX or AVX512-BF16).

    PyTorch's own probes (private, but in every 2.x release); a PyTorch without them counts as "no", so the
    precision is refused rather than run emulated.
    """
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_cache_precision(
    mode: str, *, device: str, autocast_dtype: Any, quantized: bool, weights_dtype: str = "float32"
) -> str:
    """The precision `mode` means on this device and base (never "auto"); `weights_dtype`: the unquantized base's."""
    if mode not in CACHE_PRECISIONS:
        raise ConfigError(f"cache_precision must be one of {', '.join(CACHE_PRECISIONS)}, got {mode!r}")
    if mode == "auto":
        return "autocast" if autocast_dtype is not None else "float32"
    if mode == "autocast" and autocast_dtype is None:
        raise ConfigError("cache_precision = 'autocast' needs autocast on (a CUDA device, or autocast set)")
    if mode == "bfloat16":
        if device != "cpu" or quantized:
            raise ConfigError(
                "cache_precision = 'bfloat16' is for an unquantized base on CPU; on CUDA 'auto' already builds the "
                "cache under the trainer's bf16/fp16 autocast, and a quantized base computes in its own dtype"
            )
        if not cpu_has_bf16():
            raise ConfigError(
                "cache_precision = 'bfloat16' needs a CPU with bfloat16 instructions (AMX or AVX512-BF16: Intel "
                "Xeon Sapphire Rapids or later, AMD Zen 4 or later); this one has neither and would run bfloat16 "
                "several times slower than float32. Use 'float32' (or 'int8')"
            )
    if mode in ("int8", "onnx-int8") and (device != "cpu" or quantized):
        raise ConfigError(
            f"cache_precision = {mode!r} is for an unquantized base on CPU; use 'auto' on CUDA or a quantized base"
        )
    if mode == "onnx-int8":
        import importlib.util

        if weights_dtype != "float32":
            raise ConfigError(
                f"cache_precision = 'onnx-int8' quantizes a float32 vision tower; this base is loaded in "
                f"{weights_dtype}: load it with compute_dtype = 'float32', or choose another cache_precision"
            )
        missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(
                f"cache_precision = 'onnx-int8' needs {' and '.join(missing)}, which the [edge] install leaves out: "
                "pip install 'flora-edge[edge,export]', or choose another cache_precision"
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


@contextlib.contextmanager
def bfloat16_vision_tower(model: Any, *, in_place: bool):
    """While inside: the vision tower's Linear and Conv2d weights and biases held in bfloat16 (norms, embeddings
    and the softmax stay float32 under CPU autocast, which the caller runs).

    Autocast alone would give the same numbers but cast every weight again for each chunk (ViT-B/32: 88M values
    per chunk, ~5% of the build's CPU time). The float tensors go back afterwards; with `in_place` they are let
    go instead, their pages of the mapped checkpoint dropped (as for int8): for a caller that releases it next.
    """
    import torch

    base = getattr(model, "get_base_model", lambda: model)()
    layers = [m for m in base.vision_model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    originals = [
        (m, name, getattr(m, name)) for m in layers for name in ("weight", "bias") if getattr(m, name) is not None
    ]
    for module, name, tensor in originals:
        setattr(module, name, torch.nn.Parameter(tensor.detach().to(torch.bfloat16), requires_grad=False))
    if in_place:
        from flora.modeling.residency import drop_mapped_pages

        drop_mapped_pages([tensor for _, _, tensor in originals])
        originals = []
    try:
        yield
    finally:
        for module, name, tensor in originals:
            setattr(module, name, tensor)


def _reset_meter(device: str) -> PeakMemoryMeter | None:
    """A peak-memory meter, just reset; None where the peak cannot be reset (no /proc/self/clear_refs): one
    image's cost would then read as the whole process's lifetime peak and shrink every chunk to one image."""
    meter = PeakMemoryMeter(device)
    meter.reset()
    if meter.kind == "process_peak_rss_lifetime":
        log.info("image embeddings: this system cannot reset its peak memory; the cache build keeps its chunk size")
        return None
    return meter


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
    onnx_tower: Any = None,
) -> Any:
    """[len(images), D] fp32 normalised embeddings of `images`, `chunk` at a time, under inference_mode.

    `memory_budget_mb` (as the training plan reads it: the process peak on CPU, PyTorch's allocations on CUDA):
    the first image is embedded alone and measured, and the chunk shrunk so that the rest stay within the
    budget; a large tower's activations (~60 MB an image on ViT-L/14 in 4-bit) would otherwise make the build,
    not training, the device's peak.

    `discard_tower_after`: the caller releases the tower afterwards, so the int8 and bfloat16 precisions may
    convert it in place instead of copying it (no second copy in memory; the restored tower is the checkpoint's).

    `onnx_tower`: for "onnx-int8", the `OnnxVisionTower` that computes the rows (PyTorch's tower is not run).
    """
    import torch

    family, device = clip.family, clip.device
    if precision == "onnx-int8" and onnx_tower is None:
        raise ValueError("cache_precision 'onnx-int8' needs the OnnxVisionTower that runs it (onnx_tower=)")
    if precision == "int8":
        tower = int8_vision_tower(model, in_place=discard_tower_after)
    elif precision == "bfloat16":
        tower = bfloat16_vision_tower(model, in_place=discard_tower_after)
    else:
        tower = contextlib.nullcontext()
    if precision in ("autocast", "bfloat16"):
        dtype = torch.bfloat16 if precision == "bfloat16" else autocast_dtype
        cast = torch.autocast(device_type=device.split(":")[0], dtype=dtype)
    else:
        cast = contextlib.nullcontext()
    was_training = model.training
    model.eval()
    parts = []
    try:
        with torch.inference_mode(), tower:

            def embed(batch):
                pixels = pixel_values(clip.image_processor, batch).to(device)
                if precision == "onnx-int8":
                    return onnx_tower(pixels)
                with cast:
                    return family.image_embeddings(model, pixels).float()

            first = 0
            meter = _reset_meter(device) if memory_budget_mb is not None and len(images) > 1 else None
            if meter is not None:
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
