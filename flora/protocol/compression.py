"""Optional zstd compression of an adapter body, with decompression bounded before it starts.

A compressed body declares its uncompressed size (`raw_size`) in the envelope. The receiver
checks that size against an absolute cap and a ratio cap *before* decompressing, then reads at
most `raw_size + 1` bytes out of the decompressor, so a zip bomb costs at most the declared
size, never what the frame would expand to. (`ZstdDecompressor.decompress(max_output_size=...)`
is not a bound: it trusts the size written in the frame header.)

zstandard is imported lazily: only a node that sends or receives compressed bodies needs it.
"""

from __future__ import annotations

import io
from typing import Any

from flora.errors import ProtocolError, RejectReason

COMPRESSIONS = ("none", "zstd")
ZSTD_LEVEL = 3  # zstd's default: most of the gain at a fraction of the CPU of higher levels
# Levels up to 19 use windows of at most 8 MiB; refusing larger windows caps the decoder's own memory.
ZSTD_MAX_WINDOW = 1 << 23
MAX_RAW_BYTES = 64 * 1024 * 1024  # an adapter body never needs more than this once decompressed
# Real adapter bodies compress 1.1x-4x (float noise, plus a JSON header and zero-initialised lora_B);
# 64x leaves room for an all-zero adapter and still stops a tiny frame from claiming megabytes.
MAX_RATIO = 64
RATIO_SLACK = 64 * 1024  # small bodies are mostly JSON header, which compresses better than data


def _zstd():
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is part of the install
        raise ProtocolError(
            RejectReason.MALFORMED, "body is zstd-compressed but zstandard is not installed: pip install zstandard"
        ) from None
    return zstandard


def check_compression(name: str) -> str:
    """For config validation: a known name, and the library present when it is needed."""
    if name not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")
    if name == "zstd":
        try:
            import zstandard  # noqa: F401
        except ImportError:
            raise ValueError("compression 'zstd' needs the zstandard package: pip install zstandard") from None
    return name


def compress(raw: bytes, name: str) -> tuple[bytes, dict[str, Any]]:
    """Returns (body, extra body-description fields). 'none' adds no fields, so the default wire bytes are unchanged."""
    check_compression(name)
    if name == "none":
        return raw, {}
    # write_content_size (the default) puts raw_size in the frame too; the receiver requires it to match.
    body = _zstd().ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    return body, {"compression": "zstd", "raw_size": len(raw)}


def decompress(body: bytes, meta: dict[str, Any], *, max_raw_bytes: int = MAX_RAW_BYTES) -> bytes:
    """Undo `compress` as the body description declares, refusing anything unbounded or inconsistent."""
    name = meta.get("compression", "none")
    if name == "none":
        if "raw_size" in meta:
            raise ProtocolError(RejectReason.MALFORMED, "raw_size is only allowed on a compressed body")
        return body
    if name != "zstd":
        raise ProtocolError(RejectReason.MALFORMED, f"unsupported compression {name!r}; this node knows zstd")
    raw_size = meta.get("raw_size")
    if not isinstance(raw_size, int) or isinstance(raw_size, bool) or raw_size < 0:
        raise ProtocolError(
            RejectReason.MALFORMED, f"a zstd body needs a non-negative integer raw_size, got {raw_size!r}"
        )
    if raw_size > max_raw_bytes:
        raise ProtocolError(
            RejectReason.MALFORMED, f"declared raw_size {raw_size} is over the {max_raw_bytes}-byte cap"
        )
    if raw_size > MAX_RATIO * len(body) + RATIO_SLACK:
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"declared raw_size {raw_size} is over {MAX_RATIO}x the {len(body)} compressed bytes (decompression bomb?)",
        )
    zstandard = _zstd()
    try:
        if zstandard.frame_content_size(body) != raw_size:
            raise ProtocolError(RejectReason.MALFORMED, "zstd frame does not declare the raw_size of the body")
        decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
        reader = decompressor.stream_reader(io.BytesIO(body), read_across_frames=False)
        raw = bytearray()
        # Bounded: each pass adds at least one byte or stops, and we never ask for more than raw_size + 1.
        while len(raw) <= raw_size:
            piece = reader.read(raw_size + 1 - len(raw))
            if not piece:
                break
            raw += piece
        if len(raw) != raw_size:
            raise ProtocolError(RejectReason.MALFORMED, f"zstd body does not decompress to raw_size {raw_size}")
        # The first frame is now known to hold exactly raw_size bytes; refuse anything after it.
        tail_check = decompressor.decompressobj()
        tail_check.decompress(body)
        if not tail_check.eof or tail_check.unused_data:
            raise ProtocolError(RejectReason.MALFORMED, "zstd body has bytes after its frame")
    except zstandard.ZstdError as exc:
        raise ProtocolError(RejectReason.MALFORMED, f"zstd body does not decompress: {exc}") from None
    return bytes(raw)
