"""Image embeddings of the frozen vision tower, computed once per local dataset and kept on disk.

When the recipe leaves the vision tower frozen, an image's embedding never changes: it depends on
the image, the preprocessing and the vision tower's weights, not on the adapter. So it is computed
once, stored in the state directory as safetensors, and reused by every epoch and every round, and
after a reboot.

The file carries two fingerprints and is used only if both match:
- model: the tensors of the family's image-path modules as loaded (CLIP: vision tower and visual
  projection; SigLIP: vision tower with its head; quantized bytes and quantization state included),
  their config, the image processor's settings, the compute dtype and autocast;
- data: every image's decoded pixels, in order.
Anything else (a different checkpoint, quantization, a changed or added image) rebuilds it.
Content hashes rather than file dates: copying a dataset or a model elsewhere keeps the cache valid,
and an edit that keeps a file's size and date still invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from flora.files import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"
FILE_NAME = "image_embeddings.safetensors"


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def _hash_tensor(digest: Any, name: str, tensor: Any) -> None:
    import torch

    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(flat.view(torch.uint8).numpy()))


def model_fingerprint(clip: Any, precision: str = "") -> str:
    """Identity of everything an image embedding depends on besides the image (see the module docstring)."""
    model = getattr(clip.model, "get_base_model", lambda: clip.model)()
    digest = hashlib.sha256(f"flora-image-embeddings/{CACHE_FORMAT}".encode())
    header = {
        "family": clip.family.name,
        "vision_config": _plain(model.config.vision_config.to_dict()),
        "projection_dim": getattr(model.config, "projection_dim", None),  # SigLIP has none
        "image_processor": _plain(clip.image_processor.to_dict()),
        "quantization": clip.quantization,
        "precision": precision,  # compute dtype, autocast
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for prefix, module in clip.family.image_path(model):
        for name, tensor in sorted(module.state_dict().items()):
            _hash_tensor(digest, f"{prefix}.{name}", tensor)
    return digest.hexdigest()


def images_fingerprint(images: list[Any]) -> str:
    """Identity of a list of PIL images: their decoded pixels, sizes and modes, in order."""
    digest = hashlib.sha256(f"flora-images/{CACHE_FORMAT}/{len(images)}".encode())
    for image in images:
        digest.update(f"|{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


class EmbeddingStore:
    """One safetensors file in `directory` (None: nothing persists), tagged with the fingerprints."""

    def __init__(self, directory: str | Path | None):
        self.path = Path(directory) / FILE_NAME if directory is not None else None

    def load(self, model_key: str, data_key: str) -> tuple[Any | None, str]:
        """(embeddings, why): embeddings if the file matches both fingerprints, else None and the reason."""
        if self.path is None:
            return None, "no cache directory"
        if not self.path.is_file():
            return None, "no cache yet"
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != CACHE_FORMAT:
                    return None, "cache format changed"
                if meta.get("model") != model_key:
                    return None, "base model changed"
                if meta.get("data") != data_key:
                    return None, "local data changed"
                return handle.get_tensor("image_embeddings"), "hit"
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("ignoring unreadable embedding cache %s: %s", self.path, exc)
            return None, "cache unreadable"

    def save(self, embeddings: Any, model_key: str, data_key: str) -> None:
        if self.path is None:
            return
        from safetensors.torch import save

        meta = {"format": CACHE_FORMAT, "model": model_key, "data": data_key, "examples": str(embeddings.shape[0])}
        blob = save({"image_embeddings": embeddings.detach().cpu().contiguous()}, metadata=meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, blob)
