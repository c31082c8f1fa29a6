"""How adapter tensors are stored on the wire: float32, float16, bfloat16, or int8 with float32 scales.

Every encoding maps float32 arrays to a set of safetensors entries (name -> (safetensors dtype,
shape, little-endian bytes)) and back. Decoding always returns float32 and checks that every entry
has the dtype the envelope declares, so a body cannot mix encodings or smuggle in other tensors.

- bfloat16 needs no extra library: it is the top 16 bits of a float32, rounded to nearest-even,
  stored as safetensors dtype BF16 (torch and every safetensors reader load it natively).
- int8 is symmetric: q = round(x / scale) in [-127, 127], scale = max|x| / 127 over a slice, as float32.
  `int8-tensor`: one scale per tensor. `int8-channel`: one scale per index of the tensor's shortest axis
  (the first one on a tie; tensors of fewer than 2 dimensions get one scale). For LoRA that axis is the
  rank: lora_A [r, in] gets r scales over its rows, lora_B [out, r] r scales over its columns, one per rank
  component, whose magnitudes differ most, at a cost of r floats (per output row would cost more than
  the int8 data itself at r = 2). The scales travel as F32 tensors named `<tensor name>` + SCALE_SUFFIX,
  with the tensor's number of dimensions and size 1 on every axis but the channel axis, so that
  `q * scale` broadcasts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flora.errors import ProtocolError, RejectReason

SCALE_SUFFIX = ".__scale__"


@dataclass(frozen=True)
class Encoding:
    name: str  # the setting's value: wire_encoding = "int8-channel"
    dtype: str  # body description "dtype"
    scales: str | None = None  # body description "scales": None, "tensor" or "channel"


ENCODINGS = {
    e.name: e
    for e in (
        Encoding("float32", "float32"),
        Encoding("float16", "float16"),
        Encoding("bfloat16", "bfloat16"),
        Encoding("int8-tensor", "int8", "tensor"),
        Encoding("int8-channel", "int8", "channel"),
    )
}
# Body-description dtype -> safetensors dtype of the adapter tensors.
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8"}
_NUMPY = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "I8": np.dtype("i1")}

Entry = tuple[str, tuple[int, ...], bytes]  # (safetensors dtype, shape, raw little-endian bytes)


def get_encoding(name: str) -> Encoding:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise ValueError(f"wire encoding must be one of {', '.join(ENCODINGS)}, got {name!r}") from None


def encoding_from_meta(meta: dict) -> Encoding:
    """The encoding a body description declares (`dtype`, plus `scales` for int8)."""
    dtype, scales = meta.get("dtype"), meta.get("scales")
    for encoding in ENCODINGS.values():
        if encoding.dtype == dtype and encoding.scales == scales:
            return encoding
    raise ProtocolError(RejectReason.TENSOR_DTYPE, f"unsupported wire dtype {dtype!r} with scales {scales!r}")


# -- bfloat16 without a bfloat16 library --------------------------------------------------------
def float32_to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest, ties to even
    return rounded.astype("<u2")  # values past bfloat16's range become inf, which every receiver refuses


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


# -- int8 -----------------------------------------------------------------------------------------
def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis `int8-channel` scales along: the shortest (for LoRA, the rank); None below 2 dimensions."""
    return None if len(shape) < 2 else min(range(len(shape)), key=lambda axis: (shape[axis], axis))


def scale_shape(shape: tuple[int, ...], scales: str) -> tuple[int, ...]:
    axis = channel_axis(shape) if scales == "channel" else None
    return tuple(size if i == axis else 1 for i, size in enumerate(shape))


def quantize_int8(x: np.ndarray, scales: str) -> tuple[np.ndarray, np.ndarray]:
    target = scale_shape(x.shape, scales)
    others = tuple(i for i, size in enumerate(target) if size == 1)  # the axes one scale spans
    finite_x = np.isfinite(x)
    clean = np.where(finite_x, x, 0).astype(np.float32)
    peak = np.abs(clean).max(axis=others, keepdims=True, initial=0.0).reshape(target)
    finite = finite_x.all(axis=others, keepdims=True).reshape(target)
    # An all-zero slice keeps scale 1. A slice with NaN or inf gets a NaN scale (and zeros), so the
    # receiver refuses it as non-finite, exactly as it would refuse a float body holding NaN.
    scale = np.where(finite, np.where(peak > 0, peak / 127.0, 1.0), np.nan).astype(np.float32)
    q = np.clip(np.rint(clean / np.where(finite, scale, 1.0)), -127, 127).astype(np.int8)
    return q, scale


# -- whole adapters -------------------------------------------------------------------------------
def encode_arrays(arrays: dict[str, np.ndarray], encoding: Encoding) -> dict[str, Entry]:
    """float32 arrays -> safetensors entries for this encoding."""
    entries: dict[str, Entry] = {}
    for name, x in arrays.items():
        # No finiteness check here: a receiver refuses NaN and inf, whatever the encoding.
        x = np.ascontiguousarray(x, dtype=np.float32)
        if encoding.dtype == "float32":
            entries[name] = ("F32", x.shape, x.astype("<f4").tobytes())
        elif encoding.dtype == "float16":
            with np.errstate(over="ignore"):  # past 65504 becomes inf, refused by the receiver
                entries[name] = ("F16", x.shape, x.astype("<f2").tobytes())
        elif encoding.dtype == "bfloat16":
            entries[name] = ("BF16", x.shape, float32_to_bfloat16_bits(x).tobytes())
        else:
            if name.endswith(SCALE_SUFFIX):
                raise ValueError(f"tensor name {name!r} ends with the reserved suffix {SCALE_SUFFIX!r}")
            q, scale = quantize_int8(x, encoding.scales or "tensor")
            entries[name] = ("I8", x.shape, q.tobytes())
            entries[name + SCALE_SUFFIX] = ("F32", scale.shape, scale.astype("<f4").tobytes())
    return entries


def decode_entries(entries: dict[str, Entry], encoding: Encoding) -> dict[str, np.ndarray]:
    """Safetensors entries -> float32 arrays, checking dtypes, scales and finiteness."""
    want = SAFETENSORS_DTYPES[encoding.dtype]
    out: dict[str, np.ndarray] = {}
    for name, (dtype, shape, data) in entries.items():
        if encoding.scales and name.endswith(SCALE_SUFFIX):
            owner = name[: -len(SCALE_SUFFIX)]
            if owner not in entries or owner.endswith(SCALE_SUFFIX):
                raise ProtocolError(RejectReason.MALFORMED, f"scale {name} belongs to no int8 tensor")
            continue
        if dtype != want:
            raise ProtocolError(RejectReason.TENSOR_DTYPE, f"{name} is {dtype}, the envelope declares {encoding.dtype}")
        array = np.frombuffer(data, dtype=_NUMPY[dtype]).reshape(shape)
        if dtype == "BF16":
            array = bfloat16_bits_to_float32(array)
        elif dtype == "I8":
            array = array.astype(np.float32) * _scales_for(name, shape, entries, encoding.scales)
        else:
            array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ProtocolError(RejectReason.NON_FINITE, f"{name} contains NaN or infinity")
        out[name] = array
    return out


def _scales_for(name: str, shape: tuple[int, ...], entries: dict[str, Entry], scales: str | None) -> np.ndarray:
    entry = entries.get(name + SCALE_SUFFIX)
    if entry is None:
        raise ProtocolError(RejectReason.MALFORMED, f"int8 tensor {name} has no {SCALE_SUFFIX} tensor")
    dtype, shape_of_scale, data = entry
    expected = scale_shape(shape, scales or "tensor")
    if dtype != "F32" or tuple(shape_of_scale) != expected:
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"scale of {name} must be F32 of shape {list(expected)}, got {dtype} {list(shape_of_scale)}",
        )
    scale = np.frombuffer(data, dtype="<f4").reshape(expected)
    if not (np.isfinite(scale).all() and (scale >= 0).all()):
        raise ProtocolError(RejectReason.NON_FINITE, f"scale of {name} must be finite and non-negative")
    return scale
