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


def release_image_path(loaded: Any) -> int:
    """Drop `loaded`'s image-path modules (they must be frozen); returns the bytes of tensors let go.

    A no-op returning 0 when they are released already. On CPU, the tensors left (the text side) are given
    memory of their own: transformers leaves unquantized weights as views of the memory-mapped checkpoint,
    and while one view lives the whole map, with every vision page the cache build touched, stays resident.
    """
    if is_released(loaded):
        return 0
    from flora.modeling.kbit import is_quantized, release_checkpoint_file

    base = _base(loaded)
    freed = 0
    for name in loaded.family.image_path_modules:
        module = getattr(base, name)
        if any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"{name} has trainable parameters; only a frozen image path can be released")
        freed += _tensor_bytes(module)
        setattr(base, name, ReleasedModule(name, lambda: restore_image_path(loaded)))
    del module
    if loaded.device == "cpu" and not is_quantized(base):
        release_checkpoint_file(base)
    import gc

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
    del fresh  # the text side of the second copy goes; the image path lives on in `base`
    return modules
