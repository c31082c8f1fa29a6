"""Envelope and adapter codec: symmetric round trips, a frozen golden payload, and every rejection."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from flora.errors import ProtocolError, RejectReason
from flora.protocol import Envelope, adapter_from_body, adapter_to_body, envelope_from_bytes, envelope_to_bytes

GOLDEN = Path(__file__).parent / "data" / "golden_update_v1.bin"


def golden_envelope() -> Envelope:
    tensors = {
        "base_model.model.text_model.encoder.layers.0.self_attn.out_proj.lora_A.weight": np.arange(8, dtype=np.float32)
        .reshape(2, 4)
        .__truediv__(8),
        "base_model.model.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight": np.array(
            [[1.0, -1.0], [0.5, 0.25], [0.0, 2.0], [-3.0, 1.5]], dtype=np.float32
        ),
    }
    body, meta = adapter_to_body(tensors)
    return Envelope(
        kind="update",
        run="golden",
        sender="client-0",
        round=3,
        data={"num_examples": 42, "metrics": {"train_loss": 0.5}},
        body=body,
        body_meta=meta,
        msg_id="0" * 32,
        sent_at=1_700_000_000.0,
        version="1.0",  # the frozen bytes were written at 1.0; a minor bump adds fields, never moves bytes
    )


def test_golden_payload_is_stable_both_ways():
    # Frozen bytes: any change to the wire format breaks this test, on purpose.
    encoded = envelope_to_bytes(golden_envelope())
    assert encoded == GOLDEN.read_bytes()
    decoded = envelope_from_bytes(GOLDEN.read_bytes())
    assert (decoded.kind, decoded.run, decoded.sender, decoded.round) == ("update", "golden", "client-0", 3)
    tensors = adapter_from_body(decoded.body, decoded.body_meta)
    lora_b = tensors["base_model.model.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight"]
    assert lora_b.shape == (4, 2) and lora_b[3, 0] == -3.0


def test_envelope_round_trip_preserves_every_field():
    env = golden_envelope()
    back = envelope_from_bytes(envelope_to_bytes(env))
    for field in ("kind", "run", "sender", "round", "data", "body", "msg_id", "sent_at", "version"):
        assert getattr(back, field) == getattr(env, field)
    assert back.body_meta == env.body_meta


def test_envelope_without_body():
    env = Envelope(kind="status", run="r", sender="n", data={"state": "online"})
    back = envelope_from_bytes(envelope_to_bytes(env))
    assert back.body == b"" and back.body_meta is None and back.data == {"state": "online"}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_adapter_codec_round_trip(dtype):
    rng = np.random.default_rng(0)
    tensors = {"a.lora_A.weight": rng.normal(size=(2, 64)), "a.lora_B.weight": rng.normal(size=(64, 2))}
    body, meta = adapter_to_body(tensors, dtype)
    back = adapter_from_body(body, meta)
    tol = 0 if dtype == "float32" else 1e-2
    for name, value in tensors.items():
        np.testing.assert_allclose(back[name], value.astype(np.float32), atol=tol * np.abs(value).max())
    assert meta["dtype"] == dtype and back["a.lora_A.weight"].dtype == np.float32


def test_codec_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    body, meta = adapter_to_body({"w": torch.ones(2, 3)})
    assert adapter_from_body(body, meta)["w"].sum() == 6


def _raw(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return b"FLRA" + struct.pack(">I", len(raw)) + raw + body


def _header(**changes):
    header = {"v": "1.0", "kind": "status", "run": "r", "sender": "n", "round": None, "data": {}, "body": None}
    header.update(changes)
    return header


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", RejectReason.MALFORMED),
        (b"HTTP/1.1 200 OK\r\n", RejectReason.MALFORMED),
        (b"FLRA" + struct.pack(">I", 10**6) + b"{}", RejectReason.MALFORMED),
        (b"FLRA" + struct.pack(">I", 3) + b"{x}", RejectReason.MALFORMED),
        (b"FLRA" + struct.pack(">I", 2) + b"[]", RejectReason.MALFORMED),
        (_raw(_header(v="2.0")), RejectReason.VERSION),
        (_raw(_header(kind="exploit")), RejectReason.MALFORMED),
        (_raw(_header(run="a/b")), RejectReason.MALFORMED),
        (_raw(_header(sender="#")), RejectReason.MALFORMED),
        (_raw(_header(round=-1)), RejectReason.MALFORMED),
        (_raw(_header(round="7")), RejectReason.MALFORMED),
        (_raw(_header(data=[1])), RejectReason.MALFORMED),
        (_raw(_header(), b"stray"), RejectReason.MALFORMED),
        (_raw(_header(body={"size": 3, "sha256": "0" * 64}), b"abc"), RejectReason.CHECKSUM),
        (_raw(_header(body={"size": 9, "sha256": "0" * 64}), b"abc"), RejectReason.MALFORMED),
    ],
)
def test_malformed_envelopes_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(ProtocolError) as info:
        envelope_from_bytes(payload)
    assert info.value.reason is reason


def test_truncated_golden_payload_is_rejected_not_crashed():
    data = GOLDEN.read_bytes()
    for cut in (4, 9, 100, len(data) - 1):
        with pytest.raises(ProtocolError):
            envelope_from_bytes(data[:cut])


def test_adapter_body_rejects_nan_bad_format_and_garbage():
    body, meta = adapter_to_body({"w": np.array([1.0, np.nan], dtype=np.float32)})
    with pytest.raises(ProtocolError) as info:
        adapter_from_body(body, meta)
    assert info.value.reason is RejectReason.NON_FINITE
    with pytest.raises(ProtocolError, match="safetensors"):
        adapter_from_body(body, {"format": "pickle", "dtype": "float32"})
    with pytest.raises(ProtocolError) as info:
        adapter_from_body(b"\x00" * 16, {"format": "safetensors", "dtype": "float32"})
    assert info.value.reason is RejectReason.MALFORMED
    good, meta = adapter_to_body({"w": np.ones(2)}, "float16")
    with pytest.raises(ProtocolError) as info:
        adapter_from_body(good, {**meta, "dtype": "float32"})
    assert info.value.reason is RejectReason.TENSOR_DTYPE
