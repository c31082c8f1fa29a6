"""CLIP loading, quantization, LoRA recipes and adapter tensors. Knows nothing of federation."""
