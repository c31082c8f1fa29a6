"""End-to-end integrity: Ed25519-signed envelopes, and the coordinator's authentication of updates.

Real keys and real signatures throughout; an attacker here is anyone who can rewrite bytes between the
signer and the verifier (the broker, once compromised).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.signatures import INSTRUCTIONS_FILE, Authenticator
from coordinator.validation import validate_update
from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.protocol import Envelope, adapter_to_body, envelope_from_bytes, envelope_to_bytes
from flora.protocol.envelope import MAX_HEADER_BYTES
from flora.protocol.signing import (
    KeyDirectory,
    Signer,
    generate_private_key,
    is_signed,
    load_private_key,
    load_public_key,
    seal,
    verify,
    write_private_key,
    write_public_key,
)
from tests.test_protocol import GOLDEN, golden_envelope

GLOBAL = {"x.lora_A.weight": np.zeros((2, 4), np.float32), "x.lora_B.weight": np.zeros((4, 2), np.float32)}


@pytest.fixture(scope="module")
def device_key():
    return generate_private_key()


def make_update(round_=3, in_reply_to="a" * 32, sender="c1", run="r", num_examples=10) -> Envelope:
    body, meta = adapter_to_body({k: v + 0.1 for k, v in GLOBAL.items()})
    data = {"num_examples": num_examples, "metrics": {"train_loss": 0.5}, "in_reply_to": in_reply_to}
    return Envelope(kind="update", run=run, sender=sender, round=round_, data=data, body=body, body_meta=meta)


def split(payload: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", payload[4:8])
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"FLRA" + struct.pack(">I", len(raw)) + raw + body


def reason_of(payload: bytes, key) -> RejectReason:
    with pytest.raises(ProtocolError) as caught:
        envelope_from_bytes(payload)
        verify(payload, key, signer="c1")
    return caught.value.reason


# -- the envelope signature ------------------------------------------------------------------
def test_sign_and_verify_round_trip(device_key):
    env = make_update()
    payload = Signer(device_key).sign(env)
    assert is_signed(payload)
    signed = verify(payload, device_key.public_key(), signer="c1")
    back = envelope_from_bytes(payload)  # a signed envelope is an ordinary envelope to any receiver
    assert (back.kind, back.run, back.round, back.sender, back.data, back.body) == (
        "update",
        "r",
        3,
        "c1",
        env.data,
        env.body,
    )
    assert signed["round"] == 3 and signed["body"]["sha256"] == hashlib.sha256(env.body).hexdigest()


def test_unsigned_encoding_is_unchanged_byte_for_byte(device_key):
    env = golden_envelope()
    assert seal(env, None) == envelope_to_bytes(env) == GOLDEN.read_bytes()
    signed = seal(env, Signer(device_key))
    header, body = split(signed)
    assert body == env.body  # the body is signed through its sha256, never copied or changed
    assert set(header) - set(split(GOLDEN.read_bytes())[0]) == {"sig"}
    assert header["sig"]["alg"] == "ed25519" and len(base64.b64decode(header["sig"]["value"])) == 64
    assert not is_signed(GOLDEN.read_bytes())


def test_a_tampered_body_is_refused(device_key):
    payload = Signer(device_key).sign(make_update())
    header, body = split(payload)
    forged_body = body[:-4] + np.float32(7.0).tobytes()
    # Only the body changed: its sha256 no longer matches the header.
    assert reason_of(join(header, forged_body), device_key.public_key()) is RejectReason.CHECKSUM
    # The attacker also fixes the header's sha256: the header no longer matches what was signed.
    header["body"]["sha256"] = hashlib.sha256(forged_body).hexdigest()
    with pytest.raises(ProtocolError) as caught:
        verify(join(header, forged_body), device_key.public_key(), signer="c1")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE and "body" in caught.value.detail


@pytest.mark.parametrize(
    ("field", "value"),
    [("data", {"num_examples": 10**6, "metrics": {}, "in_reply_to": "a" * 32}), ("round", 4), ("sender", "c2")],
)
def test_a_tampered_header_field_is_refused(device_key, field, value):
    header, body = split(Signer(device_key).sign(make_update()))
    header[field] = value
    with pytest.raises(ProtocolError) as caught:
        verify(join(header, body), device_key.public_key(), signer="c1")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE and field in caught.value.detail


def test_a_tampered_signed_text_is_refused(device_key):
    header, body = split(Signer(device_key).sign(make_update(num_examples=10)))
    header["sig"]["header"] = header["sig"]["header"].replace('"num_examples":10', '"num_examples":99')
    header["data"]["num_examples"] = 99  # consistent with the edited text, but the signature is not
    with pytest.raises(ProtocolError) as caught:
        verify(join(header, body), device_key.public_key(), signer="c1")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE and "does not verify" in caught.value.detail


def test_a_signature_by_another_key_is_refused(device_key):
    payload = Signer(generate_private_key()).sign(make_update())
    with pytest.raises(ProtocolError) as caught:
        verify(payload, device_key.public_key(), signer="c1")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE


def test_a_missing_signature_is_refused(device_key):
    with pytest.raises(ProtocolError) as caught:
        verify(envelope_to_bytes(make_update()), device_key.public_key(), signer="c1")
    assert caught.value.reason is RejectReason.UNSIGNED


@pytest.mark.parametrize(
    "sig",
    [
        "x",
        {"alg": "rsa", "header": "{}", "value": ""},
        {"alg": "ed25519", "header": "{}", "value": "!!not base64!!"},
        {"alg": "ed25519", "header": "\ud800", "value": ""},
        {"alg": "ed25519", "header": "{}", "value": base64.b64encode(b"short").decode()},
    ],
)
def test_a_malformed_signature_is_refused(device_key, sig):
    header, body = split(envelope_to_bytes(make_update()))
    header["sig"] = sig
    with pytest.raises(ProtocolError) as caught:
        verify(join(header, body), device_key.public_key(), signer="c1")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE


def test_a_signed_header_over_the_limit_is_refused_when_sending(device_key):
    big = make_update()
    # A header of 60% of the limit fits unsigned, but not twice over (the signed text travels in `sig`).
    big.data["metrics"] = {f"m{i}": "x" * 1000 for i in range(MAX_HEADER_BYTES * 6 // 10 // 1000)}
    assert len(envelope_to_bytes(big)) < MAX_HEADER_BYTES + len(big.body) + 8
    with pytest.raises(ValueError, match="over the"):
        Signer(device_key).sign(big)


# -- keys on disk ----------------------------------------------------------------------------
def test_keys_round_trip_through_pem_files(tmp_path, device_key):
    write_private_key(tmp_path / "k.key", device_key)
    write_public_key(tmp_path / "k.pub", device_key.public_key())
    assert (tmp_path / "k.key").stat().st_mode & 0o077 == 0  # private key: owner only
    payload = Signer(load_private_key(tmp_path / "k.key")).sign(make_update())
    verify(payload, load_public_key(tmp_path / "k.pub"), signer="c1")
    with pytest.raises(ConfigError, match="cannot read"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(tmp_path / "k.key")


def test_key_directory_follows_provisioning_and_revocation(tmp_path):
    keys = KeyDirectory(tmp_path)
    with pytest.raises(ProtocolError, match="no public key"):
        keys.get("c1")
    first, second = generate_private_key(), generate_private_key()
    write_public_key(tmp_path / "c1.pub", first.public_key())
    verify(Signer(first).sign(make_update()), keys.get("c1"), signer="c1")
    write_public_key(tmp_path / "c1.pub", second.public_key())  # re-provisioned: a new key
    (tmp_path / "c1.pub").touch()
    verify(Signer(second).sign(make_update()), keys.get("c1"), signer="c1")
    (tmp_path / "c1.pub").unlink()  # revoked
    with pytest.raises(ProtocolError) as caught:
        keys.get("c1")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE


# -- the coordinator: authenticity, then binding to the round ------------------------------------
@pytest.fixture
def coordinator_setup(tmp_path, device_key):
    keys = tmp_path / "device-keys"
    keys.mkdir()
    write_public_key(keys / "c1.pub", device_key.public_key())

    def make(**extra) -> Authenticator:
        config = CoordinatorConfig(
            model="m", run_id="r", device_keys_dir=keys, checkpoint_dir=tmp_path / "ckpt", **extra
        )
        return Authenticator(config)

    return make


def accept(auth: Authenticator, payload: bytes, round_: int):
    """What Coordinator._collect does with one update: authenticate, validate, bind."""
    env = envelope_from_bytes(payload)
    verified = auth.check_update(payload, env, "c1")
    update = validate_update(
        env, topic_node="c1", run_id="r", round_=round_, selected={"c1"}, already=set(), global_tensors=GLOBAL
    )
    auth.check_binding(env, verified)
    return update


def rejection(auth: Authenticator, payload: bytes, round_: int) -> RejectReason:
    with pytest.raises(ProtocolError) as caught:
        accept(auth, payload, round_)
    return caught.value.reason


def test_a_captured_update_cannot_be_replayed_into_another_round(coordinator_setup, device_key):
    auth = coordinator_setup()
    assert auth.required  # device_keys_dir set: signatures are required by default
    auth.instruction_published(3, "i3" * 16)
    round3 = Signer(device_key).sign(make_update(round_=3, in_reply_to="i3" * 16))
    assert accept(auth, round3, 3).num_examples == 10

    auth.instruction_published(4, "i4" * 16)
    # Re-published as it was: its signed round is 3.
    assert rejection(auth, round3, 4) is RejectReason.WRONG_ROUND
    # Re-published with the round rewritten to 4: no longer what was signed.
    header, body = split(round3)
    header["round"] = 4
    assert rejection(auth, join(header, body), 4) is RejectReason.BAD_SIGNATURE
    # Signed for round 4 but in reply to round 3's instruction (or another run's): not this round's.
    stale = Signer(device_key).sign(make_update(round_=4, in_reply_to="i3" * 16))
    assert rejection(auth, stale, 4) is RejectReason.REPLAYED
    fresh = Signer(device_key).sign(make_update(round_=4, in_reply_to="i4" * 16))
    assert accept(auth, fresh, 4).node == "c1"


def test_every_attempt_of_a_round_counts_and_survives_a_restart(coordinator_setup, device_key):
    auth = coordinator_setup()
    auth.instruction_published(2, "first" + "0" * 27)
    auth.instruction_published(2, "retry" + "0" * 27)  # a retry below quorum: same round, new instruction
    restarted = coordinator_setup()  # a crash: the broker queued an update answering the first attempt
    update = Signer(device_key).sign(make_update(round_=2, in_reply_to="first" + "0" * 27))
    assert accept(restarted, update, 2).node == "c1"
    assert json.loads((restarted._path.parent / INSTRUCTIONS_FILE).read_text())["round"] == 2


def test_unsigned_forged_and_unknown_senders_are_refused(coordinator_setup, device_key):
    auth = coordinator_setup()
    auth.instruction_published(3, "a" * 32)
    assert rejection(auth, envelope_to_bytes(make_update()), 3) is RejectReason.UNSIGNED
    assert rejection(auth, Signer(generate_private_key()).sign(make_update()), 3) is RejectReason.BAD_SIGNATURE
    stranger = Signer(device_key).sign(make_update(sender="c9"))
    env = envelope_from_bytes(stranger)
    with pytest.raises(ProtocolError) as caught:
        auth.check_update(stranger, env, "c9")
    assert caught.value.reason is RejectReason.BAD_SIGNATURE and "no public key" in caught.value.detail


def test_signatures_can_be_optional_during_a_rollout(coordinator_setup, device_key):
    auth = coordinator_setup(require_signatures=False)
    auth.instruction_published(3, "a" * 32)
    assert accept(auth, envelope_to_bytes(make_update()), 3).node == "c1"  # an unsigned device still counts
    # ...but a signature that is there must be right.
    assert rejection(auth, Signer(generate_private_key()).sign(make_update()), 3) is RejectReason.BAD_SIGNATURE


def test_without_keys_nothing_changes(tmp_path):
    auth = Authenticator(CoordinatorConfig(model="m", checkpoint_dir=tmp_path))
    env = make_update()
    assert auth.seal(env) == envelope_to_bytes(env)
    assert auth.check_update(envelope_to_bytes(env), env, "c1") is False
    auth.instruction_published(1, "x" * 32)
    assert not (tmp_path / INSTRUCTIONS_FILE).exists()


def test_requiring_signatures_needs_device_keys(tmp_path):
    with pytest.raises(ConfigError, match="device_keys_dir"):
        CoordinatorConfig(model="m", require_signatures=True)
    with pytest.raises(ConfigError, match="not a directory"):
        Authenticator(CoordinatorConfig(model="m", device_keys_dir=tmp_path / "missing", checkpoint_dir=tmp_path))
    with pytest.raises(ConfigError, match="cannot read signing key"):
        Authenticator(CoordinatorConfig(model="m", signing_key=tmp_path / "missing.key", checkpoint_dir=tmp_path))
