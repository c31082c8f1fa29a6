"""End-to-end integrity: Ed25519 signatures on envelopes, so that not even the broker can forge or alter them.

A signed envelope is an ordinary envelope (docs/PROTOCOL.md §4) whose JSON header has one more key:

    "sig": {"alg": "ed25519", "key": KEY_ID, "header": TEXT, "value": BASE64}

TEXT is the exact JSON text of the header as it would be sent unsigned: every field, the body's size and
sha256 included, so the body is signed through its hash. `value` is the Ed25519 signature of
CONTEXT + TEXT (UTF-8). A receiver verifies the signature over TEXT, then checks that TEXT parses to the very
header it received, less `sig`. Signing exact bytes means no JSON canonicalisation, in any language.

Replay is handled by what the signed header says: run, round and sender are signed, so a captured update
cannot be moved to another run, round or device, and an update's `in_reply_to` (the instruction's msg_id, a
fresh random value per instruction) binds it to one instruction; the coordinator checks that
(coordinator/signatures.py). Unsigned envelopes are unchanged byte for byte, and receivers that know nothing
of `sig` ignore it (unknown header keys are ignored, §4.2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from flora.errors import ConfigError, ProtocolError, RejectReason
from flora.files import atomic_write_bytes
from flora.protocol.envelope import MAGIC, MAX_HEADER_BYTES, Envelope, check_id, envelope_to_bytes, read_header

log = logging.getLogger(__name__)

SIG_FIELD = "sig"
ALGORITHM = "ed25519"
CONTEXT = b"flora-sig-v1\x00"  # domain separation: these signatures mean nothing outside this protocol
PUBLIC_KEY_SUFFIX = ".pub"


# -- keys --------------------------------------------------------------------------------------
def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint (16 hex) of a public key, carried in `sig.key` to make a wrong key easy to diagnose."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_private_key(path: str | Path, key: Ed25519PrivateKey) -> None:
    atomic_write_bytes(path, private_key_pem(key))  # mkstemp: mode 0600


def write_public_key(path: str | Path, key: Ed25519PublicKey) -> None:
    atomic_write_bytes(path, public_key_pem(key))
    os.chmod(path, 0o644)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}; `flora provision` makes one") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; FLoRA signs with Ed25519 keys (`flora provision`)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}; FLoRA verifies Ed25519 keys (`flora provision`)")
    return key


class KeyDirectory:
    """Public keys by node id, one PEM file `NODE.pub` each (`flora provision` writes them).

    Read when needed (and cached until the file changes), so a device provisioned while the coordinator
    runs is known at once, and a revoked one (its file removed) at once too.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._cache: dict[str, tuple[int, Ed25519PublicKey]] = {}

    def get(self, node: str) -> Ed25519PublicKey:
        """The node's key, or ProtocolError(BAD_SIGNATURE) when it has none (not provisioned, or revoked)."""
        check_id(node, "node id")  # ids cannot hold '/', so this stays inside the directory
        path = self.directory / f"{node}{PUBLIC_KEY_SUFFIX}"
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            self._cache.pop(node, None)
            raise ProtocolError(RejectReason.BAD_SIGNATURE, f"no public key for {node!r} in {self.directory}") from None
        cached = self._cache.get(node)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        try:
            key = load_public_key(path)
        except ConfigError as exc:
            log.error("unusable device key: %s", exc)
            raise ProtocolError(RejectReason.BAD_SIGNATURE, str(exc)) from None
        self._cache[node] = (mtime, key)
        return key


# -- signing -----------------------------------------------------------------------------------
class Signer:
    """Signs envelopes with one node's private key."""

    def __init__(self, private_key: Ed25519PrivateKey):
        self._key = private_key
        self.key_id = key_id(private_key.public_key())

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        return cls(load_private_key(path))

    @property
    def public_key(self):
        """The key that verifies what this signer signs (e.g. its own messages read back from the broker)."""
        return self._key.public_key()

    def sign(self, env: Envelope) -> bytes:
        """The envelope's bytes with a `sig` in its header; the body is untouched."""
        unsigned = envelope_to_bytes(env)
        (header_len,) = struct.unpack(">I", unsigned[4:8])
        text = unsigned[8 : 8 + header_len].decode("utf-8")
        header = json.loads(text)
        header[SIG_FIELD] = {
            "alg": ALGORITHM,
            "key": self.key_id,
            "header": text,
            "value": base64.b64encode(self._key.sign(CONTEXT + text.encode("utf-8"))).decode("ascii"),
        }
        raw = json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")
        if len(raw) > MAX_HEADER_BYTES:
            raise ValueError(f"signed envelope header is {len(raw)} bytes, over the {MAX_HEADER_BYTES} limit")
        return MAGIC + struct.pack(">I", len(raw)) + raw + unsigned[8 + header_len :]


def seal(env: Envelope, signer: Signer | None) -> bytes:
    """Encode an envelope, signed when this node has a signing key."""
    return signer.sign(env) if signer is not None else envelope_to_bytes(env)


# -- verifying ---------------------------------------------------------------------------------
def is_signed(payload: bytes) -> bool:
    header, _ = read_header(payload)
    return SIG_FIELD in header


def verify(payload: bytes, public_key: Ed25519PublicKey, *, signer: str) -> dict[str, Any]:
    """Check that `payload` (a whole envelope that decodes) was signed by `public_key`, unaltered.

    Returns the signed header. Raises ProtocolError: UNSIGNED when there is no signature, BAD_SIGNATURE
    when it is malformed, made with another key, or the header was changed after signing. The body is
    covered through the header's sha256, which envelope decoding checks against the body.
    """
    header, _ = read_header(payload)
    sig = header.pop(SIG_FIELD, None)
    if sig is None:
        raise ProtocolError(RejectReason.UNSIGNED, f"message from {signer} is not signed")
    if (
        not isinstance(sig, dict)
        or sig.get("alg") != ALGORITHM
        or not isinstance(sig.get("header"), str)
        or not isinstance(sig.get("value"), str)
    ):
        raise ProtocolError(RejectReason.BAD_SIGNATURE, 'signature is not {"alg": "ed25519", "header", "value"}')
    try:
        value = base64.b64decode(sig["value"], validate=True)
        signed_bytes = CONTEXT + sig["header"].encode("utf-8")
    except (ValueError, binascii.Error, UnicodeEncodeError):
        raise ProtocolError(RejectReason.BAD_SIGNATURE, "signature value or signed header is not encoded") from None
    try:
        public_key.verify(value, signed_bytes)
    except (InvalidSignature, ValueError):
        raise ProtocolError(
            RejectReason.BAD_SIGNATURE,
            f"signature does not verify with {signer}'s key {key_id(public_key)} "
            f"(it names key {str(sig.get('key'))[:32]!r}): forged, or signed with another key",
        ) from None
    try:
        signed = json.loads(sig["header"])
    except (ValueError, RecursionError):
        signed = None
    if not isinstance(signed, dict):
        raise ProtocolError(RejectReason.BAD_SIGNATURE, "signed header is not a JSON object")
    if _canonical(signed) != _canonical(header):
        changed = sorted(k for k in set(signed) | set(header) if _canonical(signed.get(k)) != _canonical(header.get(k)))
        raise ProtocolError(
            RejectReason.BAD_SIGNATURE, f"header fields {', '.join(changed)[:200]} were changed after signing"
        )
    return signed


def _canonical(value: Any) -> str:
    # Both sides were parsed by the same JSON parser, so this compares them as JSON values, types included
    # (true is not 1, 1 is not 1.0); no sender has to reproduce this form.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
