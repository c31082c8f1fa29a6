"""Image embeddings of the frozen vision tower, computed once per local dataset and kept on disk.

When the recipe leaves the vision tower frozen, an image's embedding never changes: it depends on
the image, the preprocessing and the vision tower's weights, not on the adapter. So it is computed
once, stored in the state directory as safetensors, and reused by every epoch and every round, and
after a reboot.

The file holds one row per distinct image, keyed by the image's content hash, and one model fingerprint:
- model: the tensors of the family's image-path modules as loaded (CLIP: vision tower and visual
  projection; SigLIP: vision tower with its head; quantized bytes and quantization state included),
  their config, the image processor's settings, the compute dtype, autocast and the cache's precision;
  when it differs, every row is stale;
- each row's key: the image's decoded pixels, size and mode (`image_key`).
So the cache is incremental: a new or edited image costs one embedding, a removed one costs nothing, and
the rows of the images that stayed are reused (whatever their order). Content hashes rather than file
dates: copying a dataset or a model elsewhere keeps the cache valid, and an edit that keeps a file's size
and date still invalidates its row. Hashing the model's tensors on every start would cost more than the rest of
the check, so the model fingerprint is remembered beside the cache by the checkpoint files' identity
(`ModelKeyMemo`, which says why that is safe) and taken again only when that identity changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from flora.files import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = "2"  # 2: rows keyed by image content (1: one data fingerprint for all)
FILE_NAME = "image_embeddings.safetensors"
MEMO_FILE_NAME = "image_embeddings.model_key.json"  # ModelKeyMemo's


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}


def _hash_tensor(digest: Any, name: str, tensor: Any) -> None:
    import torch

    flat = tensor.detach().reshape(-1).contiguous().cpu()
    digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(memoryview(flat.view(torch.uint8).numpy()))


def _header(clip: Any, precision: str) -> dict:
    """What an embedding depends on besides the image and the image path's tensors: cheap to read."""
    model = getattr(clip.model, "get_base_model", lambda: clip.model)()
    return {
        "family": clip.family.name,
        "vision_config": _plain(model.config.vision_config.to_dict()),
        "projection_dim": getattr(model.config, "projection_dim", None),  # SigLIP has none
        "image_processor": _plain(clip.image_processor.to_dict()),
        "quantization": clip.quantization,
        "precision": precision,  # compute dtype, autocast
    }


def model_fingerprint(clip: Any, precision: str = "") -> str:
    """Identity of everything an image embedding depends on besides the image (see the module docstring).

    It reads every tensor of the image path (ViT-B/32: 350 MB, 0.2-0.6 s of SHA-256 and the first touch of the
    mapped checkpoint): `ModelKeyMemo` spares a restart that cost.
    """
    model = getattr(clip.model, "get_base_model", lambda: clip.model)()
    digest = hashlib.sha256(f"flora-image-embeddings/{CACHE_FORMAT}".encode())
    digest.update(json.dumps(_header(clip, precision), sort_keys=True, default=str).encode())
    for prefix, module in clip.family.image_path(model):
        for name, tensor in sorted(module.state_dict().items()):
            _hash_tensor(digest, f"{prefix}.{name}", tensor)
    return digest.hexdigest()


class ModelKeyMemo:
    """`model_fingerprint` remembered beside the image cache, by what the file system says about the checkpoint.

    The fingerprint hashes the image path's tensors as loaded; on every start, that is the one cost of checking
    the cache that grows with the model. The memo (one small JSON file in the cache directory) keeps the last
    fingerprint with the identity it was taken under, and a start whose identity is the same reuses it:
    - the checkpoint files' identity, taken when they were loaded (`LoadedModel.checkpoint_identity`): the
      directory and, per file (config.json and the weights), size, mtime, ctime, inode and device;
    - the checkpoint's sampled content fingerprint (flora.modeling.fingerprint: its headers and 16 slices of
      each file, a few hundred KB read);
    - the rest of the fingerprint's inputs (`_header`: config, image processor, quantization, precision) and
      the versions of the libraries that turn the files into tensors (torch, transformers, peft, bitsandbytes).

    Why an equal identity means equal weights. A checkpoint's bytes change only through a write to its files.
    Writing in place updates the file's mtime and ctime; replacing it (save_pretrained, a download, cp, mv,
    rsync) gives a new inode or at least a new ctime. The kernel sets ctime to the current time on every change
    of a file's data or metadata, and no system call lets a program set it back (touch, cp -p and rsync -t
    restore mtime only), so a rewritten file shows a new ctime even where its size and mtime were kept. What
    is left: a write within one tick of the file system's clock (FAT stamps in 2 s steps), excluded by not
    remembering an identity younger than 2 s ("settled"); someone who resets the system clock or writes the
    block device under the file system, who could as well rewrite the cache itself; and a file system that
    reports no real ctime or inode (e.g. a FAT card mounted by some drivers), where the sampled content
    fingerprint still tells apart two checkpoints that differ in most of their bytes. Where an identity cannot
    be taken (a hub id not on disk, files that changed during the load), the tensors are hashed as before.
    The identity describes the checkpoint as loaded, the same assumption the released image path's reload
    rests on (flora.modeling.residency): code that changes the frozen image path's weights in memory after
    the load must not point the trainer at a cache directory.
    """

    def __init__(self, directory: str | Path | None):
        self.path = Path(directory) / MEMO_FILE_NAME if directory is not None else None

    def model_key(self, clip: Any, precision: str = "") -> str:
        """`model_fingerprint(clip, precision)`, from the memo when the identity is the one it was taken under."""
        identity = self._identity(clip, precision)
        if identity is None or self.path is None:
            return model_fingerprint(clip, precision)
        try:
            memo = json.loads(self.path.read_text())
        except (OSError, ValueError):
            memo = {}
        if isinstance(memo, dict) and memo.get("identity") == identity and isinstance(memo.get("model"), str):
            return memo["model"]
        key = model_fingerprint(clip, precision)
        if clip.checkpoint_identity.get("settled"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps({"identity": identity, "model": key}, sort_keys=True).encode())
        return key

    @staticmethod
    def _identity(clip: Any, precision: str) -> dict | None:
        from flora.modeling.fingerprint import model_fingerprint as sampled_fingerprint

        checkpoint = getattr(clip, "checkpoint_identity", None)
        if checkpoint is None:
            return None
        identity = {
            "format": CACHE_FORMAT,
            "checkpoint": checkpoint,
            "sampled": sampled_fingerprint(clip.name_or_path),
            "header": _header(clip, precision),
            "libraries": {name: _version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")},
        }
        return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as it reads back from the file


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def images_fingerprint(images: list[Any]) -> str:
    """Identity of a list of PIL images: their decoded pixels, sizes and modes, in order."""
    digest = hashlib.sha256(f"flora-images/{CACHE_FORMAT}/{len(images)}".encode())
    for image in images:
        digest.update(f"|{image.mode}|{image.size}|".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def image_key(image: Any) -> bytes:
    """A PIL image's identity (32 bytes): its decoded pixels, size and mode."""
    digest = hashlib.sha256(f"flora-image/{image.mode}/{image.size}|".encode())
    digest.update(image.tobytes())
    return digest.digest()


class EmbeddingStore:
    """One safetensors file in `directory` (None: nothing persists): rows keyed by image, tagged with the model."""

    def __init__(self, directory: str | Path | None):
        self.path = Path(directory) / FILE_NAME if directory is not None else None

    def load(self, model_key: str) -> tuple[dict[bytes, Any], str]:
        """({image key: embedding row}, why): the rows stored for `model_key`, else {} and the reason."""
        if self.path is None:
            return {}, "no cache directory"
        if not self.path.is_file():
            return {}, "no cache yet"
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("format") != CACHE_FORMAT:
                    return {}, "cache format changed"
                if meta.get("model") != model_key:
                    return {}, "base model changed"
                embeds, keys = handle.get_tensor("image_embeddings"), handle.get_tensor("image_keys")
        except (SafetensorError, OSError, KeyError) as exc:
            log.warning("ignoring unreadable embedding cache %s: %s", self.path, exc)
            return {}, "cache unreadable"
        if keys.ndim != 2 or keys.shape[1] != 32 or keys.shape[0] != embeds.shape[0]:
            log.warning("ignoring inconsistent embedding cache %s", self.path)
            return {}, "cache unreadable"
        return {bytes(k): row for k, row in zip(keys.numpy(), embeds)}, "hit"

    def save(self, rows: dict[bytes, Any], model_key: str) -> None:
        """Write `rows` (image key -> embedding), replacing the file atomically."""
        if self.path is None or not rows:
            return
        import numpy as np
        import torch
        from safetensors.torch import save

        keys = torch.from_numpy(np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 32).copy())
        embeds = torch.stack([row.detach().cpu().float() for row in rows.values()]).contiguous()
        meta = {"format": CACHE_FORMAT, "model": model_key, "examples": str(len(rows))}
        blob = save({"image_embeddings": embeds, "image_keys": keys}, metadata=meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, blob)
