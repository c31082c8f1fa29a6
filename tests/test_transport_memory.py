from flora.transport import MemoryBroker, MemoryTransport, Message


def test_wildcards_retained_messages_and_last_will():
    broker = MemoryBroker()
    observer, device = MemoryTransport(broker, "observer"), MemoryTransport(broker, "device")
    device.connect(will=Message("flora/v1/r/status/device", b"offline", retain=True))
    device.publish(Message("flora/v1/r/status/device", b"online", retain=True))
    observer.connect()
    observer.subscribe("flora/v1/r/status/+")
    assert observer.receive(0.1).payload == b"online"  # retained, delivered on subscribe
    device.drop()  # vanish without a clean disconnect
    assert observer.receive(0.1).payload == b"offline"
    assert observer.receive(0.01) is None


def test_clean_close_does_not_fire_the_will():
    broker = MemoryBroker()
    observer, device = MemoryTransport(broker, "o"), MemoryTransport(broker, "d")
    observer.connect()
    observer.subscribe("#")
    device.connect(will=Message("w", b"gone"))
    device.close()
    assert observer.receive(0.01) is None
