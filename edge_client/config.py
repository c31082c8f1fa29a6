"""Edge client settings: `flora client --config client.toml`, overridable by FLORA_CLIENT_* variables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flora.config import field, load_config
from flora.errors import ConfigError, ProtocolError
from flora.modeling.loading import COMPUTE_DTYPES, QUANTIZATIONS
from flora.modeling.recipes import get_recipe
from flora.protocol.chunking import DEFAULT_MAX_MESSAGE_BYTES
from flora.protocol.envelope import check_id
from flora.protocol.wire_settings import wire_settings_problem

ENV_PREFIX = "FLORA_CLIENT_"
DATA_FORMATS = ("image-folder",)


@dataclasses.dataclass
class ClientConfig:
    node_id: str = field(help="this device's id; also its MQTT client id and topic level")
    model: str = field(help="CLIP checkpoint: hub id (openai/clip-vit-base-patch32) or local directory")
    data_dir: Path = field(help="local training data; never leaves the device")
    run_id: str = field("default", help="federated run to join")
    broker_url: str = field("mqtt://127.0.0.1:1883", help="mqtt://host:port or mqtts://host:port")
    username: str | None = field(None, help="broker username")
    password: str | None = field(None, help="broker password")
    ca_file: str | None = field(None, help="CA certificate for mqtts://")
    cert_file: str | None = field(None, help="client certificate for mqtts:// (optional)")
    key_file: str | None = field(None, help="client private key for mqtts:// (optional)")
    data_format: str = field("image-folder", help="image-folder: one subfolder per class")
    recipe: str = field("paper", help="LoRA recipe; must match the coordinator's")
    quantization: str = field("none", help="base model quantization: none, 8bit, 4bit (NF4)")
    compute_dtype: str = field("float32", help="compute dtype: float32, float16, bfloat16")
    device: str = field("auto", help="auto, cuda or cpu")
    batch_size: int = field(32, help="largest local batch size")
    state_dir: Path = field(Path("flora-client-state"), help="where progress survives a reboot")
    max_message_bytes: int | None = field(
        DEFAULT_MAX_MESSAGE_BYTES, help="largest MQTT packet the broker takes; bigger messages go as chunks"
    )
    wire_encoding: str = field(
        "float32", help="adapter update on the wire: float32, float16, bfloat16, int8-tensor, int8-channel"
    )
    wire_compression: str = field("none", help="compression of the adapter update: none or zstd")
    exit_when_finished: bool = field(False, help="exit when the coordinator ends the run (demo, tests)")
    seed: int = field(0, help="seed for local shuffling")
    log_level: str = field("INFO", help="DEBUG, INFO, WARNING, ERROR")

    def __post_init__(self):
        try:
            check_id(self.node_id, "node_id")
            check_id(self.run_id, "run_id")
        except ProtocolError as exc:
            raise ConfigError(exc.detail) from None
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.data_format not in DATA_FORMATS:
            raise ConfigError(f"data_format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        problem = wire_settings_problem(
            max_message_bytes=self.max_message_bytes, encoding=self.wire_encoding, compression=self.wire_compression
        )
        if problem:
            raise ConfigError(problem)
        get_recipe(self.recipe)


def load_client_config(path: str | Path | None = None, **overrides) -> ClientConfig:
    return load_config(ClientConfig, path, env_prefix=ENV_PREFIX, overrides=overrides)
