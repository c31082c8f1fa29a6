"""Validation shared by the roles' wire settings: size limit, adapter encoding and compression.

Returns messages that say how to fix the setting; each role's config turns them into ConfigError.
"""

from __future__ import annotations

from flora.protocol.chunking import MIN_MAX_MESSAGE_BYTES
from flora.protocol.compression import COMPRESSIONS, check_compression
from flora.protocol.encodings import ENCODINGS


def wire_settings_problem(*, max_message_bytes: int | None, encoding: str, compression: str) -> str | None:
    """None when the settings are usable, else what to change."""
    if max_message_bytes is not None and max_message_bytes < MIN_MAX_MESSAGE_BYTES:
        return (
            f"max_message_bytes must be at least {MIN_MAX_MESSAGE_BYTES} (chunk headers need room), got "
            f'{max_message_bytes}; set it to your broker\'s limit (AWS IoT Core: 128 KB), or "none" for no limit'
        )
    if encoding not in ENCODINGS:
        return f"wire_encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}"
    if compression not in COMPRESSIONS:
        return f"wire_compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
    try:
        check_compression(compression)
    except ValueError as exc:  # zstd without the zstandard package
        return f"wire_compression {compression!r}: {exc}"
    return None
