"""Decode one image defensively: a corrupt or unreadable file is reported, never allowed to crash a round."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class SkippedImages:
    """Counts and names the images a loader passed over, and logs each once."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str, reason: object) -> None:
        self.names.append(name)
        log.warning("skipping unreadable image %s: %s", name, reason)

    def __len__(self) -> int:
        return len(self.names)


def read_rgb(source: str | Path | bytes, name: str, skipped: SkippedImages) -> Any | None:
    """The image as a fully decoded RGB PIL image, or None (counted in `skipped`) if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.convert("RGB")  # decodes every pixel now, so truncation shows here, not mid-round
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:  # PIL raises SyntaxError on some
        skipped.add(name, exc)
        return None
