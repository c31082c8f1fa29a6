"""The edge device agent: trains LoRA on local data and returns only the adapter update."""
