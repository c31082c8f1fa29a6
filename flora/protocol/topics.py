"""The MQTT topic scheme. One place builds every topic; docs/PROTOCOL.md describes it.

flora/v1/{run}/instruction        coordinator -> all clients   retained, QoS 1
flora/v1/{run}/update/{node}      client -> coordinator        QoS 1
flora/v1/{run}/status/{node}      any node's presence          retained, QoS 1, Last Will
flora/v1/{run}/metrics            coordinator round results    retained, QoS 1
"""

from __future__ import annotations

from dataclasses import dataclass

from flora.protocol.envelope import check_id

ROOT = "flora/v1"


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

    @property
    def metrics(self) -> str:
        return f"{ROOT}/{self.run}/metrics"

    @staticmethod
    def node_of(topic: str) -> str:
        """The last level of an update or status topic: the node the broker delivered it for."""
        return topic.rsplit("/", 1)[-1]


ALL_RUNS_STATUS = f"{ROOT}/+/status/+"
ALL_RUNS_METRICS = f"{ROOT}/+/metrics"
