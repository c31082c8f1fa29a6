"""What this device can do, announced in its retained status message so the coordinator can select."""

from __future__ import annotations

import os
import platform
import resource


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


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def detect_capabilities(device: str, dataset_size: int, quantization: str) -> dict:
    import torch

    caps = {
        "hostname": platform.node(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerator": "cpu",
        "memory_total_mb": _total_memory_mb(),
        "memory_free_mb": _available_memory_mb(),
        "dataset_size": dataset_size,
        "quantization": quantization,
        "supports_4bit": _bitsandbytes_available(),
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


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # a broken native library raises more than ImportError
        return False
    return True
