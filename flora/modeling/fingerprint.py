"""A cheap, stable fingerprint of a base checkpoint: do the coordinator and a device hold the same weights?

Two checkpoints of one architecture have the same tensor names and shapes, so a check of shapes alone passes a
device that fine-tunes on the wrong base (another revision, another fine-tune) and its adapters are averaged
into the fleet's without a warning. The fingerprint hashes:

- config.json (architecture and sizes),
- each weights file's size and its safetensors header (names, dtypes, shapes, offsets),
- SAMPLES slices of SAMPLE_BYTES evenly spread over each weights file's data: two checkpoints that differ in
  their weights differ almost everywhere, so a few slices tell them apart.

That reads a few hundred KB whatever the checkpoint's size: a 600 MB checkpoint on a Jetson's SD card costs
about as much as the tiny test model (bench/fingerprint_cost.py). It is computed once per process and path.
It does not depend on how the model is loaded (fp32, 4-bit): it fingerprints the files both sides load.
A hub id is fingerprinted from the local hub cache when it is there; otherwise there is none (None), and
nothing is compared.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
import time
from pathlib import Path

log = logging.getLogger(__name__)

SAMPLES = 16
SAMPLE_BYTES = 4096
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
FINGERPRINT_CHARS = 16  # hex digits kept: 64 bits, plenty to tell checkpoints apart, short in a log line
SETTLE_SECONDS = 2.0  # a checkpoint file changed more recently than this has no settled identity (below)


def model_fingerprint(model: str) -> str | None:
    """The fingerprint of the checkpoint `model` names (a directory or a cached hub id), or None."""
    found = _checkpoint_files(model)
    if found is None:
        return None
    directory, files = found
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(str(directory), stamp)


def checkpoint_identity(model: str) -> dict | None:
    """What the file system says about the checkpoint `model` names, read without opening a file: its directory
    and, for config.json and each weights file, (name, size, mtime, ctime, inode, device); None where `model` is
    no local checkpoint. Equal identities mean the files were not rewritten in between (edge_client/cache.py's
    `ModelKeyMemo` says why that holds, and where it would not).
    """
    found = _checkpoint_files(model)
    if found is None:
        return None
    directory, files = found
    now = time.time_ns()
    stats = [(p.name, p.stat()) for p in files]  # stat follows a hub snapshot's symlinks to the blobs
    return {
        "directory": str(directory.resolve()),
        "files": [[name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino, s.st_dev] for name, s in stats],
        # False while a file changed less than SETTLE_SECONDS ago: a write within the file system's timestamp
        # granularity (FAT: 2 s; Linux stamps files from a clock that ticks every few ms) could still follow
        # and leave every field as it is; nothing should be remembered by such an identity (git's index calls
        # these entries "racily clean" and handles them the same way).
        "settled": all(now - max(s.st_mtime_ns, s.st_ctime_ns) >= SETTLE_SECONDS * 1e9 for _, s in stats),
    }


def _checkpoint_files(model: str) -> tuple[Path, list[Path]] | None:
    """(directory, [config.json, weights files sorted by name]) of the checkpoint `model` names, or None."""
    directory = _local_dir(model)
    if directory is None:
        return None
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    config = directory / "config.json"
    if not files or not config.is_file():
        return None
    return directory, [config, *files]


@functools.lru_cache(maxsize=8)
def _fingerprint(directory: str, stamp: tuple) -> str:
    """Cached per directory and (name, size, mtime) of its files: a replaced checkpoint is fingerprinted again."""
    digest = hashlib.sha256()
    root = Path(directory)
    digest.update(_canonical_config(root / "config.json"))
    for name, size, _ in stamp[1:]:
        digest.update(f"{name}\0{size}\0".encode())
        with open(root / name, "rb") as handle:
            start = _data_start(handle, name)
            handle.seek(0)
            digest.update(handle.read(start))  # the header: names, dtypes, shapes, offsets
            span = max(size - start, 0)
            for i in range(SAMPLES):
                handle.seek(start + span * i // SAMPLES)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _canonical_config(path: Path) -> bytes:
    """config.json with sorted keys, without the keys a save rewrites (library version, the source path)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return path.read_bytes()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash"):
        config.pop(volatile, None)
    return json.dumps(config, sort_keys=True).encode()


def _data_start(handle, name: str) -> int:
    """Where a safetensors file's data begins (8 bytes of header length, then the header); 0 for other formats."""
    if not name.endswith(".safetensors"):
        return 0
    head = handle.read(8)
    if len(head) < 8:
        return 0
    return 8 + struct.unpack("<Q", head)[0]


def _local_dir(model: str) -> Path | None:
    path = Path(model)
    if path.is_dir():
        return path
    try:  # a hub id, fingerprinted only from the local cache: this must never reach a network
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # no hub library, or an id it refuses: no fingerprint
        return None
    return Path(cached).parent if isinstance(cached, str) else None
