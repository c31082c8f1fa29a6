"""Versioned message envelope: a JSON header and an optional binary body in one MQTT payload.

Layout (all integers big-endian):

    b"FLRA" | u32 header length | header (UTF-8 JSON object) | body (header["body"]["size"] bytes)

The header names protocol version, kind, run, round and sender; a body (an adapter as
safetensors bytes) is described by its format, dtype, size and sha256. Decoding checks every
field and raises ProtocolError with a reason; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import time
import uuid
from typing import Any

from flora.errors import ProtocolError, RejectReason

MAGIC = b"FLRA"
PROTOCOL_VERSION = "1.3"  # what each minor version added: docs/PROTOCOL.md §9
# Bounded, yet room for a train instruction naming ~8,000 selected nodes of the longest (128-character) ids.
MAX_HEADER_BYTES = 1024 * 1024

# "chunk" is one piece of a message split to fit the broker's size limit (flora/protocol/chunking.py);
# the chunking transport consumes chunks, so roles never see that kind. "presence" (1.2) asks every client of a
# run to publish its status now; "reject" (1.2) tells one node why its update was refused (docs/PROTOCOL.md §5.7, §5.8).
KINDS = ("status", "train", "update", "round_result", "finished", "chunk", "presence", "reject")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def check_id(value: Any, what: str) -> str:
    """Run and node ids become MQTT topic levels, so no '/', '+', '#' or spaces."""
    if not isinstance(value, str) or not _ID.match(value):
        raise ProtocolError(
            RejectReason.MALFORMED,
            f"{what} {value!r} must be 1-128 characters of letters, digits, '_', '.', '-'",
        )
    return value


@dataclasses.dataclass
class Envelope:
    kind: str
    run: str
    sender: str
    round: int | None = None
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    body_meta: dict[str, Any] | None = None  # format, dtype, encoding: set by the codec
    msg_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    sent_at: float = dataclasses.field(default_factory=time.time)
    version: str = PROTOCOL_VERSION


def envelope_to_bytes(env: Envelope) -> bytes:
    if env.kind not in KINDS:
        raise ValueError(f"unknown envelope kind {env.kind!r}")
    check_id(env.run, "run id")
    check_id(env.sender, "sender id")
    header: dict[str, Any] = {
        "v": env.version,
        "kind": env.kind,
        "run": env.run,
        "round": env.round,
        "sender": env.sender,
        "msg_id": env.msg_id,
        "sent_at": env.sent_at,
        "data": env.data,
        "body": None,
    }
    if env.body:
        header["body"] = {
            **(env.body_meta or {}),
            "size": len(env.body),
            "sha256": hashlib.sha256(env.body).hexdigest(),
        }
    raw = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"envelope header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
    return MAGIC + struct.pack(">I", len(raw)) + raw + env.body


def major(version: Any) -> int:
    if isinstance(version, bool) or not isinstance(version, (str, int, float)):
        raise ProtocolError(RejectReason.MALFORMED, f"protocol version {version!r} is not MAJOR.MINOR")
    try:
        return int(str(version)[:32].split(".", 1)[0])
    except ValueError:
        raise ProtocolError(
            RejectReason.MALFORMED, f"protocol version {str(version)[:32]!r} is not MAJOR.MINOR"
        ) from None


def minor(version: Any) -> int | None:
    """The minor part of MAJOR.MINOR, or None where there is none (the tolerated "1" or 1): what a peer's
    version says about the fields it knows (§9)."""
    parts = str(version)[:32].split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def read_header(payload: bytes, *, check_version: bool = True) -> tuple[dict[str, Any], int]:
    """The JSON header of an envelope and where its body starts; checks only the framing and the version.

    Cheap (the body is neither copied nor hashed), so the chunking transport can route on `kind`.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(RejectReason.MALFORMED, "payload is not bytes")
    if len(payload) < 8 or bytes(payload[:4]) != MAGIC:
        raise ProtocolError(RejectReason.MALFORMED, "payload does not start with the FLRA magic")
    (header_len,) = struct.unpack(">I", payload[4:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(payload):
        raise ProtocolError(RejectReason.MALFORMED, f"declared header length {header_len} is out of bounds")
    try:
        header = json.loads(bytes(payload[8 : 8 + header_len]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, an integer of 4300+ digits, deep nesting
        raise ProtocolError(RejectReason.MALFORMED, f"header is not UTF-8 JSON: {str(exc)[:200]}") from None
    if not isinstance(header, dict):
        raise ProtocolError(RejectReason.MALFORMED, "header is not a JSON object")
    version = header.get("v")
    if check_version and major(version) != major(PROTOCOL_VERSION):
        sender = str(header.get("sender"))[:128]
        raise ProtocolError(
            RejectReason.VERSION,
            f"{sender!r} speaks protocol {str(version)[:32]!r}, this node speaks {PROTOCOL_VERSION!r} and only "
            f"accepts major version {major(PROTOCOL_VERSION)}; run the same major version of flora-edge on the "
            "coordinator and every client (upgrade the older side)",
        )
    return header, 8 + header_len


def envelope_from_bytes(payload: bytes) -> Envelope:
    """Parse and check an envelope. Raises ProtocolError; never returns a half-valid object."""
    header, body_start = read_header(payload)
    payload = bytes(payload)
    header_len = body_start - 8
    version = header.get("v")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ProtocolError(RejectReason.MALFORMED, f"unknown kind {kind!r}")
    round_ = header.get("round")
    if round_ is not None and (not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0):
        raise ProtocolError(RejectReason.MALFORMED, f"round must be a non-negative integer, got {round_!r}")
    data = header.get("data", {})
    if not isinstance(data, dict):
        raise ProtocolError(RejectReason.MALFORMED, "data must be a JSON object")
    body = payload[8 + header_len :]
    meta = header.get("body")
    if meta is None:
        if body:
            raise ProtocolError(RejectReason.MALFORMED, f"{len(body)} body bytes but no body description")
    else:
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("size"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            raise ProtocolError(RejectReason.MALFORMED, "body description needs integer size and sha256")
        if meta["size"] != len(body):
            raise ProtocolError(RejectReason.MALFORMED, f"body is {len(body)} bytes, header says {meta['size']}")
        if hashlib.sha256(body).hexdigest() != meta["sha256"]:
            raise ProtocolError(RejectReason.CHECKSUM, "body sha256 does not match the header")
    sent_at = header.get("sent_at", 0.0)
    msg_id = header.get("msg_id", "")
    if not isinstance(sent_at, (int, float)) or not isinstance(msg_id, str) or abs(sent_at) > 1e300:
        raise ProtocolError(RejectReason.MALFORMED, "sent_at must be a number and msg_id a string")
    return Envelope(
        kind=kind,
        run=check_id(header.get("run"), "run id"),
        sender=check_id(header.get("sender"), "sender id"),
        round=round_,
        data=data,
        body=body,
        body_meta={k: v for k, v in meta.items() if k not in ("size", "sha256")} if meta else None,
        msg_id=msg_id,
        sent_at=float(sent_at),
        version=str(version),
    )
