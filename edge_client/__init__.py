"""The edge device agent: trains LoRA on local data and returns only the adapter update.

Public API (see docs/API.md); names are imported on first use, so `import edge_client` is cheap:

    config = load_client_config("client.toml")   # or ClientConfig(node_id=..., model=..., data_dir=...)
    build_agent(config).run()
"""

from flora.lazy_exports import lazy_exports

_EXPORTS = {
    "EdgeAgent": "edge_client.agent",
    "ClientConfig": "edge_client.config",
    "load_client_config": "edge_client.config",
    "build_agent": "edge_client.main",
    "run_client": "edge_client.main",
    "LocalTrainer": "edge_client.trainer",
    "TrainSettings": "edge_client.trainer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
