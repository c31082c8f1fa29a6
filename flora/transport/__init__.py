"""Message transport: one small interface, an MQTT implementation and an in-memory twin."""

from flora.transport.base import Message, Transport, TransportError
from flora.transport.memory import MemoryBroker, MemoryTransport

__all__ = ["MemoryBroker", "MemoryTransport", "Message", "Transport", "TransportError", "connect_transport"]


def connect_transport(url: str, client_id: str, **kwargs) -> Transport:
    """Build the transport a URL names: mqtt://host:port, mqtts://host:port, or memory://NAME."""
    if url.startswith("memory://"):
        return MemoryTransport(MemoryBroker.named(url[len("memory://") :]), client_id)
    from flora.transport.mqtt import MqttTransport

    return MqttTransport(url, client_id, **kwargs)
