"""Message transport: one small interface, an MQTT implementation and an in-memory twin."""

from flora.transport.base import Message, Transport, TransportError
from flora.transport.memory import MemoryBroker, MemoryTransport

__all__ = [
    "MemoryBroker",
    "MemoryTransport",
    "Message",
    "Transport",
    "TransportError",
    "connect_transport",
    "transport_for",
]


def connect_transport(url: str, client_id: str, **kwargs) -> Transport:
    """Build the transport a URL names: mqtt://host:port, mqtts://host:port, or memory://NAME."""
    if url.startswith("memory://"):
        return MemoryTransport(MemoryBroker.named(url[len("memory://") :]), client_id)
    from flora.transport.mqtt import MqttTransport

    return MqttTransport(url, client_id, **kwargs)


def transport_for(settings, *, clean_session: bool = False) -> Transport:
    """The transport a role's settings describe (broker_url, node_id, credentials, TLS files, size limit).

    Persistent sessions by default: the broker queues QoS 1 messages for a role while it restarts.
    Always wrapped in ChunkingTransport: messages over `max_message_bytes` go out as chunks, and
    chunks from peers are reassembled even when this node has no limit of its own.
    """
    from flora.transport.chunked import ChunkingTransport

    inner = connect_transport(
        settings.broker_url,
        settings.node_id,
        clean_session=clean_session,
        username=settings.username,
        password=settings.password,
        ca_file=settings.ca_file,
        cert_file=settings.cert_file,
        key_file=settings.key_file,
        max_message_bytes=settings.max_message_bytes,
        mqtt_version=settings.mqtt_version,
    )
    return ChunkingTransport(inner, settings.max_message_bytes)
