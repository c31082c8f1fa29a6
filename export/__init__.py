"""Merge the federated adapter into the full-precision base and export ONNX for ONNX Runtime."""
