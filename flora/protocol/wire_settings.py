"""Validation shared by the roles' wire settings: size limit, adapter encoding and compression.

Returns messages that say how to fix the setting; each role's config turns them into ConfigError.
"""

from __future__ import annotations

from flora.protocol.chunking import MIN_MAX_MESSAGE_BYTES
from flora.protocol.compression import COMPRESSIONS, MAX_RAW_BYTES, check_compression
from flora.protocol.encodings import ENCODINGS

WIDTHS = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}  # bytes per value of each body dtype
UPDATE_HEADER_ROOM = 1024 * 1024  # the safetensors header (tensor names, shapes) and int8 scales, generously


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


def adapter_size_problem(parameters: int, *, encoding: str, recipe: str) -> str | None:
    """None when an adapter of `parameters` values, sent in `encoding`, fits one message; else what to change.

    Every receiver caps an adapter body at MAX_RAW_BYTES (compression's cap, and the chunk reassembler's
    per-transfer cap, both 64 MiB): a recipe that trains whole modules of a large model (fedfft on ViT-B/32,
    ~126M values) cannot travel, and is refused when the node starts rather than in the first round.
    """
    width = WIDTHS[ENCODINGS[encoding].dtype]
    size = parameters * width
    if size + UPDATE_HEADER_ROOM <= MAX_RAW_BYTES:
        return None
    int8_fits = width > 1 and parameters + UPDATE_HEADER_ROOM <= MAX_RAW_BYTES
    hint = f"set wire_encoding = int8-channel ({parameters / 2**20:.0f} MiB), or " if int8_fits else ""
    return (
        f"recipe {recipe!r} on this model sends {parameters:,} values per update, {size / 2**20:.0f} MiB as "
        f"{encoding}: over the {MAX_RAW_BYTES / 2**20:g} MiB an adapter message may carry "
        f"(flora.protocol.compression.MAX_RAW_BYTES); {hint}use a LoRA recipe or a smaller model"
    )


def concurrent_uploads(parameters: int, *, encoding: str, buffered_bytes: int) -> int:
    """How many chunked updates of `parameters` values in `encoding` a receiver can reassemble at once.

    A receiver holds every partial transfer of every sender within one buffer (ChunkLimits.max_buffered_bytes);
    past it the oldest partial transfers are dropped. LoRA updates fit by the hundred; a recipe that trains whole
    modules may fit a handful, so more clients uploading together lose updates.
    """
    size = parameters * WIDTHS[ENCODINGS[encoding].dtype] + UPDATE_HEADER_ROOM
    return buffered_bytes // size
