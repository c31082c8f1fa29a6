"""What this device can do, announced in its retained status message so the coordinator can select.

Quantization support is a real check, not an import: bitsandbytes imports fine on a Jetson whose
wheel lacks kernels for the Orin GPU (sm_87) and fails only at the first quantized matmul. So the
probe quantizes one small layer to NF4 (or int8), runs a forward pass on the training device and
compares the result with the full-precision layer. It is cached per (kind, device).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import resource

log = logging.getLogger(__name__)


def _total_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def _available_memory_mb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _device_model() -> str | None:
    """The board's name from the device tree (e.g. "NVIDIA Jetson Orin Nano Developer Kit"), if any."""
    try:
        with open("/proc/device-tree/model", "rb") as handle:
            return handle.read().rstrip(b"\x00\n").decode(errors="replace") or None
    except OSError:
        return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.cache
def quantization_problem(kind: str, device: str = "cpu") -> str | None:
    """None if bitsandbytes can quantize and run a `kind` ('4bit' or '8bit') layer on `device`, else why not."""
    if kind not in ("4bit", "8bit"):
        raise ValueError(f"unknown quantization {kind!r}")
    try:
        import bitsandbytes as bnb
        import torch
    except Exception as exc:  # a broken native library raises more than ImportError
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 64, generator=generator) / 8
        x = torch.randn(4, 64, generator=generator)
        if kind == "4bit":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
        layer = layer.to(device)  # quantizes
        with torch.no_grad():
            out = layer(x.to(device)).float().cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    except Exception as exc:  # CUDA "no kernel image", "named symbol not found", missing CPU backend, ...
        first_line = (str(exc).strip().splitlines() or [""])[0]
        version = getattr(bnb, "__version__", "?")
        return f"bitsandbytes {version} failed to run a {kind} layer on {device}: {type(exc).__name__}: {first_line}"
    reference = x @ weight.t()
    similarity = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
    if not torch.isfinite(out).all() or similarity < 0.95:
        return f"bitsandbytes ran a {kind} layer on {device} but its output is wrong (cosine {similarity:.3f})"
    return None


def quantization_support(device: str) -> dict[str, bool]:
    return {kind: quantization_problem(kind, device) is None for kind in ("4bit", "8bit")}


def detect_capabilities(
    device: str, dataset_size: int, quantization: str, *, configured_quantization: str | None = None
) -> dict:
    """`quantization` is the one in effect (after any fallback); `configured_quantization` the one asked for."""
    import torch

    support = quantization_support(device)
    caps = {
        "hostname": platform.node(),
        "device_model": _device_model(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerator": "cpu",
        "memory_total_mb": _total_memory_mb(),
        "memory_free_mb": _available_memory_mb(),
        "dataset_size": dataset_size,
        "quantization": quantization,
        "quantization_configured": configured_quantization or quantization,
        "supports_4bit": support["4bit"],
        "supports_8bit": support["8bit"],
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        caps.update(
            accelerator=props.name,
            gpu_memory_total_mb=total / 2**20,
            gpu_memory_free_mb=free / 2**20,
            compute_capability=f"{props.major}.{props.minor}",
        )
    return caps
