"""Adapter tensors <-> envelope body: safetensors bytes, never pickle.

Works on NumPy arrays so a torch-free party (a third-party client, an inference box) can
speak the protocol; torch tensors are accepted on the way in and converted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flora.errors import ProtocolError, RejectReason

WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
MAX_TENSORS = 4096


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(value))


def adapter_to_body(tensors: dict[str, Any], dtype: str = "float32") -> tuple[bytes, dict[str, Any]]:
    """Serialize named tensors; returns (body bytes, body description for the envelope)."""
    from safetensors.numpy import save

    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {', '.join(WIRE_DTYPES)}, got {dtype!r}")
    arrays = {name: _to_numpy(t).astype(WIRE_DTYPES[dtype]) for name, t in sorted(tensors.items())}
    return save(arrays), {"format": "safetensors", "dtype": dtype, "tensors": len(arrays)}


def adapter_from_body(body: bytes, meta: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Parse a body back into float32 arrays, checking format, dtype, count and finiteness."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if not meta or meta.get("format") != "safetensors":
        raise ProtocolError(
            RejectReason.MALFORMED, f"body format must be safetensors, got {meta and meta.get('format')!r}"
        )
    dtype = meta.get("dtype")
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(RejectReason.TENSOR_DTYPE, f"unsupported wire dtype {dtype!r}")
    try:
        arrays = load(bytes(body))
    except (SafetensorError, ValueError, OSError) as exc:
        raise ProtocolError(RejectReason.MALFORMED, f"body is not valid safetensors: {exc}") from None
    if len(arrays) > MAX_TENSORS:
        raise ProtocolError(RejectReason.MALFORMED, f"{len(arrays)} tensors is over the {MAX_TENSORS} limit")
    out = {}
    for name, array in arrays.items():
        if array.dtype != WIRE_DTYPES[dtype]:
            raise ProtocolError(RejectReason.TENSOR_DTYPE, f"{name} is {array.dtype}, envelope declares {dtype}")
        if not np.isfinite(array).all():
            raise ProtocolError(RejectReason.NON_FINITE, f"{name} contains NaN or infinity")
        out[name] = array.astype(np.float32)
    return out
