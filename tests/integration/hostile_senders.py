"""Hostile senders for the flood tests and bench/attacks.py, run as a process of their own (as an attacker would
be), so that the memory they use is not counted as the coordinator's:

    python -m tests.integration.hostile_senders ATTACK BROKER_URL RUN_ID

Prints the number of payload bytes it published (QoS 1, every one acknowledged by the broker) and exits.
"""

from __future__ import annotations

import os
import sys

from flora.protocol import Envelope, Topics, envelope_to_bytes
from flora.protocol.chunking import split_message
from flora.transport.base import Message
from flora.transport.mqtt import MqttTransport

MiB = 1024 * 1024


def early_updates(topics: Topics, run: str, count: int = 24, size: int = 8 * MiB):
    """Issue 10 item 2: large unsigned updates for the round about to open, on the attacker's own update topic."""
    for _ in range(count):
        body = os.urandom(size)
        env = Envelope(
            kind="update",
            run=run,
            sender="mallory",
            round=1,
            data={"num_examples": 10},
            body=body,
            body_meta={"format": "safetensors"},
        )
        yield topics.update("mallory"), envelope_to_bytes(env)


def partial_transfers(topics: Topics, run: str, count: int = 320):
    """Item 3: the first chunk of `count` transfers that never complete, on the attacker's own update topic."""
    for _ in range(count):
        env = Envelope(
            kind="update",
            run=run,
            sender="mallory",
            round=1,
            body=os.urandom(12_000),
            body_meta={"format": "safetensors"},
        )
        yield split_message(topics.update("mallory"), envelope_to_bytes(env), 4096)[0]


def fake_statuses(topics: Topics, run: str, count: int = 2000, size: int = 120_000):
    """Item 6: `count` fake nodes announce themselves with a `size`-byte status (not eligible for this run)."""
    junk = "x" * size
    for i in range(count):
        node = f"fake-{i}"
        data = {"state": "online", "recipe": "not-this-run", "capabilities": {"junk": junk}}
        yield topics.status(node), envelope_to_bytes(Envelope(kind="status", run=run, sender=node, data=data))


ATTACKS = {"early_updates": early_updates, "partial_transfers": partial_transfers, "fake_statuses": fake_statuses}


def main(attack: str, url: str, run: str) -> int:
    transport = MqttTransport(url, f"attacker-{os.getpid()}")
    transport.connect()
    sent = 0
    try:
        for topic, payload in ATTACKS[attack](Topics(run), run):
            transport.publish(Message(topic, payload, qos=1), timeout=60)
            sent += len(payload)
    finally:
        transport.close()
    print(sent)
    return sent


if __name__ == "__main__":
    main(*sys.argv[1:4])
