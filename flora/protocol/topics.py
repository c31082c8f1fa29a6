"""The MQTT topic scheme. One place builds every topic; docs/PROTOCOL.md describes it.

flora/v1/{run}/instruction        coordinator -> all clients   retained, QoS 1
flora/v1/{run}/update/{node}      client -> coordinator        QoS 1
flora/v1/{run}/status/{node}      any node's presence          retained, QoS 1, Last Will
flora/v1/{run}/metrics            coordinator round results    retained, QoS 1
flora/v1/{run}/presence           coordinator -> all clients   QoS 1, not retained (1.2): "publish your status"
flora/v1/{run}/notice/{node}      coordinator -> one client    QoS 1 (1.2: why its update was refused)

A message over the broker's size limit travels as chunks (flora/protocol/chunking.py): chunk i of n
on `{topic}/chunk/{i}` for i < n - 1 and the last chunk on `{topic}` itself, so every retained chunk
keeps its own slot and replacing the message on `{topic}` orphans the old chunks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flora.protocol.envelope import check_id

ROOT = "flora/v1"
# Ids a node may be configured with: the characters every broker maps to one topic level unchanged. The wire
# still accepts the wider envelope rule (a '.' too) from older peers, but RabbitMQ's MQTT plugin turns '.' into
# a level separator (it maps topics onto AMQP routing keys), so a node id "a.b" is never seen there.
SAFE_ID_CHARS = "letters, digits, '_' and '-'"
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_-]")
CHUNK_LEVEL = "chunk"
_CHUNK_TOPIC = re.compile(rf"^(.+)/{CHUNK_LEVEL}/(0|[1-9][0-9]{{0,8}})$")


ALL_RUNS_STATUS = f"{ROOT}/+/status/+"  # every run's statuses: the coordinator names devices of another run


def run_of_status_topic(topic: str) -> str | None:
    """`flora/v1/{run}/status/{node}` -> run; None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT or parts[3] != "status":
        return None
    return parts[2]


@dataclass(frozen=True)
class Topics:
    run: str

    def __post_init__(self):
        check_id(self.run, "run id")

    @property
    def instruction(self) -> str:
        return f"{ROOT}/{self.run}/instruction"

    def update(self, node: str) -> str:
        return f"{ROOT}/{self.run}/update/{check_id(node, 'node id')}"

    @property
    def all_updates(self) -> str:
        return f"{ROOT}/{self.run}/update/+"

    def status(self, node: str) -> str:
        return f"{ROOT}/{self.run}/status/{check_id(node, 'node id')}"

    @property
    def all_status(self) -> str:
        return f"{ROOT}/{self.run}/status/+"

    def notice(self, node: str) -> str:
        return f"{ROOT}/{self.run}/notice/{check_id(node, 'node id')}"

    @property
    def metrics(self) -> str:
        return f"{ROOT}/{self.run}/metrics"

    @property
    def presence(self) -> str:
        return f"{ROOT}/{self.run}/presence"

    @staticmethod
    def node_of(topic: str) -> str:
        """The last level of an update or status topic: the node the broker delivered it for."""
        return topic.rsplit("/", 1)[-1]


def check_safe_id(value: object, what: str) -> str:
    """A run or node id a broker maps to one topic level unchanged (1.2); raises ValueError saying why not."""
    if isinstance(value, str) and _SAFE_ID.match(value):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string of {SAFE_ID_CHARS}, got {value!r}")
    bad = _UNSAFE_CHAR.search(value)
    if bad is not None:
        why = (
            "RabbitMQ's MQTT plugin maps '.' to a topic level separator, so the node would never be seen there"
            if bad.group() == "."
            else "it is outside the characters every broker maps to a topic level unchanged"
        )
        raise ValueError(
            f"{what} {value!r} contains {bad.group()!r}: {why}. Use only {SAFE_ID_CHARS} (docs/PROTOCOL.md §1)"
        )
    if len(value) > 128:
        raise ValueError(f"{what} {value[:40]!r}... is {len(value)} characters; at most 128 of {SAFE_ID_CHARS}")
    raise ValueError(f"{what} {value!r} must start with a letter or digit, then {SAFE_ID_CHARS}")


ALL_RUNS_STATUS = f"{ROOT}/+/status/+"
ALL_RUNS_METRICS = f"{ROOT}/+/metrics"


def chunk_topic(topic: str, index: int) -> str:
    """Where chunk `index` (not the last one) of a message for `topic` is published."""
    return f"{topic}/{CHUNK_LEVEL}/{index}"


def split_chunk_topic(topic: str) -> tuple[str, int] | None:
    """`{topic}/chunk/{i}` -> (topic, i); None for any other topic."""
    match = _CHUNK_TOPIC.match(topic)
    return (match.group(1), int(match.group(2))) if match else None


def chunk_filter(topic_filter: str) -> str | None:
    """The filter that also catches the chunk slots of what `topic_filter` matches (None: it already does)."""
    return None if topic_filter.endswith("#") else f"{topic_filter}/{CHUNK_LEVEL}/+"
