"""The wire protocol: envelopes, topics and the adapter payload codec. See docs/PROTOCOL.md."""

from flora.protocol.codec import adapter_from_body, adapter_to_body
from flora.protocol.envelope import PROTOCOL_VERSION, Envelope, envelope_from_bytes, envelope_to_bytes
from flora.protocol.topics import Topics

__all__ = [
    "PROTOCOL_VERSION",
    "Envelope",
    "Topics",
    "adapter_from_body",
    "adapter_to_body",
    "envelope_from_bytes",
    "envelope_to_bytes",
]
