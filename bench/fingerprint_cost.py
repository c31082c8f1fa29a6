"""What announcing a base-model fingerprint costs: flora.modeling.fingerprint against hashing the whole weights file.

    python bench/fingerprint_cost.py [--size-mb 600]

Prints JSON: milliseconds for the tiny test model and for a synthetic checkpoint of --size-mb (a 600 MB
safetensors file of random float16, like a ViT-B/16 CLIP), read cold (its pages evicted from the page cache with
posix_fadvise, as after a reboot) and warm, beside a full SHA-256 of the same file, cold; and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from pathlib import Path

from flora.modeling import fingerprint
from flora.modeling.tiny import write_tiny_clip


def _evict(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _timed_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def _synthetic(directory: Path, size_mb: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "clip", "synthetic": True}))
    size = size_mb * 1024 * 1024
    header = json.dumps({"w": {"dtype": "F16", "shape": [size // 2], "data_offsets": [0, size]}}).encode()
    with open(directory / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        for _ in range(size_mb):
            handle.write(os.urandom(1024 * 1024))
        handle.flush()
        os.fsync(handle.fileno())


def _full_sha256(directory: Path) -> None:
    import hashlib

    digest = hashlib.sha256()
    with open(directory / "model.safetensors", "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = write_tiny_clip(Path(tmp) / "tiny")
        big = Path(tmp) / "big"
        _synthetic(big, args.size_mb)
        results = {}
        for name, directory in (("tiny", tiny), (f"synthetic_{args.size_mb}mb", big)):
            _evict(directory)
            fingerprint._fingerprint.cache_clear()
            results[f"{name}_cold_ms"] = round(_timed_ms(lambda d=directory: fingerprint.model_fingerprint(str(d))), 2)
            results[f"{name}_cached_ms"] = round(
                _timed_ms(lambda d=directory: fingerprint.model_fingerprint(str(d))), 3
            )
        _evict(big)
        results[f"synthetic_{args.size_mb}mb_full_sha256_cold_ms"] = round(_timed_ms(lambda: _full_sha256(big)), 1)
        results["full_sha256_over_fingerprint"] = round(
            results[f"synthetic_{args.size_mb}mb_full_sha256_cold_ms"] / results[f"synthetic_{args.size_mb}mb_cold_ms"],
            1,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
