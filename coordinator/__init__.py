"""The coordinator: selects clients, publishes the global adapter, aggregates, checkpoints, resumes.

Public API (see docs/API.md); names are imported on first use, so `import coordinator` is cheap:

    config = load_coordinator_config("coordinator.toml")     # or CoordinatorConfig(model=..., ...)
    report = build_coordinator(config, subscribers=[my_callback]).run()
"""

from flora.lazy_exports import lazy_exports

_EXPORTS = {
    "Coordinator": "coordinator.server",
    "RoundFailed": "coordinator.server",
    "CoordinatorConfig": "coordinator.config",
    "load_coordinator_config": "coordinator.config",
    "build_coordinator": "coordinator.main",
    "run_coordinator": "coordinator.main",
    "Evaluator": "coordinator.evaluation",
    "Requirements": "coordinator.registry",
    "EventBus": "coordinator.events",
    "Event": "coordinator.events",
    "RunStarted": "coordinator.events",
    "RunResumed": "coordinator.events",
    "RoundStarted": "coordinator.events",
    "InstructionPublished": "coordinator.events",
    "UpdateAccepted": "coordinator.events",
    "UpdateRejected": "coordinator.events",
    "UpdatesCollected": "coordinator.events",
    "Aggregated": "coordinator.events",
    "Evaluated": "coordinator.events",
    "CheckpointSaved": "coordinator.events",
    "RoundEnded": "coordinator.events",
    "ResultPublished": "coordinator.events",
    "RunFinished": "coordinator.events",
    "RunFailed": "coordinator.events",
    "make_tracker": "coordinator.trackers",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
