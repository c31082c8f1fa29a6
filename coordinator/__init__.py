"""The coordinator: selects clients, publishes the global adapter, aggregates, checkpoints, resumes."""
