"""What every node on the broker is configured with: its identity, how it connects, what it sends, how it logs.

`NodeSettings` is the one place these settings are declared, validated and documented; the
coordinator's and the edge client's configs extend it with their own fields (keyword-only
dataclasses, so a role may give `node_id` a default without reordering anything). The TOML files
stay flat: a role's file holds these keys beside its own.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from flora.config import field
from flora.errors import ConfigError
from flora.protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from flora.protocol.topics import check_safe_id
from flora.protocol.wire_settings import wire_settings_problem

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(kw_only=True)
class NodeSettings:
    node_id: str = field(help="this node's id; also its MQTT client id and topic level")
    run_id: str = field("default", help="federated run id; the coordinator and its clients share it")
    broker_url: str = field("mqtt://127.0.0.1:1883", help="mqtt://host:port or mqtts://host:port")
    username: str | None = field(None, help="broker username")
    password: str | None = field(None, help="broker password")
    ca_file: str | None = field(None, help="CA certificate for mqtts://")
    cert_file: str | None = field(None, help="client certificate for mqtts:// (optional)")
    key_file: str | None = field(None, help="client private key for mqtts:// (optional)")
    max_message_bytes: int | None = field(
        DEFAULT_MAX_MESSAGE_BYTES, help="largest MQTT packet the broker takes; bigger messages go as chunks"
    )
    wire_encoding: str = field(
        "float32",
        help="adapters this node sends: float32 (lossless), float16, bfloat16, int8-tensor, int8-channel",
    )
    wire_compression: str = field("none", help="compression of the adapters this node sends: none or zstd")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING, ERROR")
    mqtt_version: str = field(
        "3.1.1",
        help='"3.1.1" or "5"; with 5, the broker bounds in-flight deliveries to this node (Receive Maximum)',
    )

    def __post_init__(self):
        try:  # the strict rule, not the wire's: an id a broker rewrites would never be seen (PROTOCOL.md §1)
            check_safe_id(self.node_id, "node_id")
            check_safe_id(self.run_id, "run_id")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        problem = wire_settings_problem(
            max_message_bytes=self.max_message_bytes, encoding=self.wire_encoding, compression=self.wire_compression
        )
        if problem:
            raise ConfigError(problem)
        if self.mqtt_version not in ("3.1.1", "5"):
            raise ConfigError(f'mqtt_version must be "3.1.1" or "5", got {self.mqtt_version!r}')
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")

    def check_files(self) -> None:
        """The TLS files this node names exist. Checked when a role starts (before it loads a model), not at config
        load: `flora provision` builds configs naming files on another machine."""
        if not self.broker_url.startswith("mqtts://"):
            return
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value and not Path(value).is_file():
                what = "the broker's CA certificate" if name == "ca_file" else "this node's certificate or key"
                raise ConfigError(
                    f"{name} {value} does not exist or is not a file; put {what} there "
                    f"(deploy/mosquitto/make-certs.sh writes them), or set {name} to where it is"
                )

    @property
    def logging_level(self) -> int:
        return getattr(logging, self.log_level)
