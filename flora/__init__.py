"""FLoRA Edge: federated fine-tuning of CLIP with LoRA on edge devices, coordinated over MQTT.

The `flora` package is the shared core that every role imports: the wire protocol, the
transport, model loading and LoRA recipes, data and partitioners. The core never imports a role
(`edge_client`, `coordinator`, `export`) nor the application layer `flora.app` (the CLI, demo,
status and provisioning), which sits above the roles and composes them.
"""

__version__ = "0.1.0"

from flora.errors import ConfigError, DataError, FloraError, ProtocolError, RejectReason, StateError
from flora.lazy_exports import lazy_exports

_EXPORTS = {
    "NodeSettings": "flora.settings",
    "RoundRecord": "flora.records",
    "RunReport": "flora.records",
}
__all__ = [
    "ConfigError",
    "DataError",
    "FloraError",
    "NodeSettings",
    "ProtocolError",
    "RejectReason",
    "RoundRecord",
    "RunReport",
    "StateError",
    "__version__",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
