"""Let a frozen image path go from memory, and bring it back from the checkpoint when something calls it.

With the paper's recipe the vision tower never trains, and once every image's embedding is cached nothing
runs it: on ViT-B/32 it is 350 MB of a ~1 GB training process (ViT-L/14: 1.2 GB in fp32), memory an 8 GB
Jetson shares with the OS and a camera pipeline. `release_image_path` swaps the family's image-path modules
(CLIP: vision_model and visual_projection) for weightless `ReleasedModule` placeholders. Calling one (an
evaluation through `get_image_features`, a new image to embed) loads the checkpoint again the way it was loaded
first (same path, quantization, compute dtype, device; a quantized base prepared like the trainer prepares it,
so the weights and hence the cache fingerprint are the same) and puts the real modules back.

Both sides are exact: a restored tower computes what the released one did, bit for bit, because bitsandbytes'
quantization and the file's weights are deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


class ReleasedModule(torch.nn.Module):
    """Stands where an image-path module was: no weights; the first call restores them and runs the real one."""

    def __init__(self, name: str, restore: Callable[[], dict[str, Any]]):
        super().__init__()
        self.released_name = name
        self._restore = restore

    def forward(self, *args, **kwargs):
        return self._restore()[self.released_name](*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.released_name}: released; reloaded from the checkpoint when called"


def _base(loaded: Any) -> Any:
    return getattr(loaded.model, "get_base_model", lambda: loaded.model)()


def is_released(loaded: Any) -> bool:
    base = _base(loaded)
    return any(isinstance(getattr(base, name), ReleasedModule) for name in loaded.family.image_path_modules)


def _tensor_bytes(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


MADV_DONTNEED = 4
_PAGE = 4096


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory maps of .safetensors files (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as handle:
            lines = handle.readlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[-1].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return spans


def drop_mapped_pages(module: Any) -> int:
    """Tell the kernel the pages of `module`'s tensors (a module, or an iterable of tensors) that view a
    memory-mapped checkpoint are not needed.

    transformers leaves unquantized weights as views of the checkpoint's map, and the map lives as long as
    any view does: dropping the vision tower's tensors alone would leave every page the cache build touched
    resident, mapped for the text tower's sake. madvise(MADV_DONTNEED) unmaps those pages now. Only pages
    wholly inside the module's tensors are dropped, and these weights are read-only (frozen, never written),
    so a page shared with a live tensor would only be read back from the file. Returns the bytes advised.
    """
    import ctypes

    spans = _file_mappings()
    if not spans:
        return 0
    tensors = [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else list(module)
    ranges = []
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if any(lo <= start and end <= hi for lo, hi in spans):
            ranges.append((start, end))
    ranges.sort()
    merged: list[list[int]] = []
    for start, end in ranges:
        if merged and start <= merged[-1][1] + _PAGE:  # neighbours in the file: one range, gaps under a page
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    libc = ctypes.CDLL(None, use_errno=True)
    advised = 0
    for start, end in merged:
        first = -(-start // _PAGE) * _PAGE  # whole pages inside the range only
        last = end // _PAGE * _PAGE
        if last > first and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0:
            advised += last - first
    return advised


def release_image_path(loaded: Any) -> int:
    """Drop `loaded`'s image-path modules (they must be frozen); returns the bytes of tensors let go.

    A no-op returning 0 when they are released already. On CPU, the released tensors' pages of a
    memory-mapped checkpoint are dropped with them (`drop_mapped_pages`); the text side stays mapped, so
    only what training touches of it is resident (of the token embedding, the rows of the prompts' tokens).
    """
    if is_released(loaded):
        return 0
    import gc
    import weakref

    base = _base(loaded)
    freed = 0
    gone = []
    for name in loaded.family.image_path_modules:
        module = getattr(base, name)
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{name} has trainable parameters; only a frozen image path can be released")
        freed += _tensor_bytes(module)
        if loaded.device == "cpu":
            drop_mapped_pages(module)
        gone.append(weakref.ref(module))
        setattr(base, name, ReleasedModule(name, lambda: restore_image_path(loaded)))
    del module
    # Reference counting frees the modules as the last reference goes (the common case, tested); only a
    # reference cycle through them needs the collector, whose full pass costs ~0.25 s of CPU with torch and
    # transformers loaded: ~4% of a ViT-B/32 first round.
    if any(ref() is not None for ref in gone):
        gc.collect()
    log.info("released the image path (%.0f MB)", freed / 2**20)
    return freed


def restore_image_path(loaded: Any) -> dict[str, Any]:
    """Load the image-path modules from `loaded`'s checkpoint again and put them in place; name -> module.

    Returns the modules in place already when nothing was released.
    """
    from flora.modeling.kbit import is_quantized, prepare_quantized_for_training
    from flora.modeling.loading import load_model

    base = _base(loaded)
    if not is_released(loaded):
        return {name: getattr(base, name) for name in loaded.family.image_path_modules}
    log.info("reloading the image path from %s", loaded.name_or_path)
    fresh = load_model(
        loaded.name_or_path,
        quantization=loaded.quantization,
        compute_dtype=loaded.compute_dtype,
        device=loaded.device,
    )
    if is_quantized(fresh.model):
        prepare_quantized_for_training(fresh.model)  # what the trainer did to the original: fp32 norms etc.
    modules = {}
    for name in loaded.family.image_path_modules:
        module = getattr(fresh.model, name)
        module.requires_grad_(False)
        module.train(base.training)
        setattr(base, name, module)
        modules[name] = module
    # The image path is now the one this load read: what the image cache's key memo must describe.
    loaded.checkpoint_identity = fresh.checkpoint_identity
    del fresh  # the text side of the second copy goes; the image path lives on in `base`
    return modules
