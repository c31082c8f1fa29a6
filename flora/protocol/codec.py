"""Adapter tensors <-> envelope body: safetensors bytes, never pickle.

Works on NumPy arrays so a torch-free party (a third-party client, an inference box) can
speak the protocol; torch tensors are accepted on the way in and converted.

The body description in the envelope declares everything a receiver needs:
`{"format": "safetensors", "dtype": ..., "tensors": N}` plus, only when used, `"scales"` (int8)
and `"compression": "zstd", "raw_size": ...`. The default (float32, uncompressed) adds no field,
so its bytes are exactly what they were before encodings existed (tests/data/golden_update_v1.bin).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from flora.errors import ProtocolError, RejectReason
from flora.protocol.compression import MAX_RAW_BYTES, compress, decompress
from flora.protocol.encodings import Entry, decode_entries, encode_arrays, encoding_from_meta, get_encoding

MAX_TENSORS = 4096
MAX_SAFETENSORS_HEADER = 1024 * 1024
# safetensors lays tensors out by dtype size, largest first, then by name; we do the same so a float32
# body is byte-identical to safetensors.numpy.save's (and to every body sent before this module existed).
_DTYPE_RANK = {"F32": 3, "BF16": 2, "F16": 1, "I8": 0}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(value))


def safetensors_bytes(entries: dict[str, Entry]) -> bytes:
    """A safetensors file: u64 LE header length, JSON header (space-padded to 8 bytes), then the data."""
    order = sorted(entries, key=lambda name: (-_DTYPE_RANK[entries[name][0]], name))
    header, offset = {}, 0
    for name in order:
        dtype, shape, data = entries[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(entries[name][2] for name in order)


def _parse_safetensors(raw: bytes) -> dict[str, Entry]:
    from safetensors import SafetensorError, deserialize

    # 4096 tensors with long PEFT names need well under 1 MiB of header; refuse a larger one unparsed.
    declared = struct.unpack("<Q", raw[:8])[0] if len(raw) >= 8 else 0
    if declared > MAX_SAFETENSORS_HEADER:
        raise ProtocolError(
            RejectReason.MALFORMED, f"safetensors header of {declared} bytes is over {MAX_SAFETENSORS_HEADER}"
        )
    try:
        parsed = deserialize(raw)  # Rust: checks header size, offsets, and data length against shapes
    except (SafetensorError, ValueError, OSError, TypeError) as exc:
        raise ProtocolError(RejectReason.MALFORMED, f"body is not valid safetensors: {exc}") from None
    if len(parsed) > MAX_TENSORS:
        raise ProtocolError(RejectReason.MALFORMED, f"{len(parsed)} tensors is over the {MAX_TENSORS} limit")
    return {name: (info["dtype"], tuple(info["shape"]), bytes(info["data"])) for name, info in parsed}


def adapter_to_body(
    tensors: dict[str, Any], encoding: str = "float32", compression: str = "none"
) -> tuple[bytes, dict[str, Any]]:
    """Serialize named tensors; returns (body bytes, body description for the envelope)."""
    spec = get_encoding(encoding)
    arrays = {name: _to_numpy(t).astype(np.float32) for name, t in sorted(tensors.items())}
    raw = safetensors_bytes(encode_arrays(arrays, spec))
    body, extra = compress(raw, compression)
    meta: dict[str, Any] = {"format": "safetensors", "dtype": spec.dtype, "tensors": len(arrays)}
    if spec.scales:
        meta["scales"] = spec.scales
    return body, {**meta, **extra}


def adapter_from_body(
    body: bytes, meta: dict[str, Any] | None, *, max_raw_bytes: int = MAX_RAW_BYTES
) -> dict[str, np.ndarray]:
    """Parse a body back into float32 arrays, checking format, encoding, size, count and finiteness.

    Raises ProtocolError (and nothing else) for any input: the body and its description come off the network.
    """
    if not isinstance(meta, dict) or meta.get("format") != "safetensors":
        format_ = meta.get("format") if isinstance(meta, dict) else None
        raise ProtocolError(RejectReason.MALFORMED, f"body format must be safetensors, got {format_!r}")
    encoding = encoding_from_meta(meta)
    raw = decompress(bytes(body), meta, max_raw_bytes=max_raw_bytes)
    entries = _parse_safetensors(raw)
    try:
        return decode_entries(entries, encoding)
    except (ValueError, KeyError) as exc:  # e.g. a shape that does not fit its data: refuse, never crash
        raise ProtocolError(RejectReason.MALFORMED, f"body tensors are inconsistent: {exc}") from None
