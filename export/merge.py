"""Merge a PEFT adapter into a full-precision base model.

Never into a quantized base: a bitsandbytes model cannot be exported to ONNX, and merging into
4-bit weights would round the adapter away. Two full-precision bases are offered:

- "original": the checkpoint's fp32 weights, loaded through the same `from_pretrained` path as
  everywhere else (the default; exact when clients trained unquantized);
- "dequantized-4bit": the NF4 weights clients trained against with quantization = "4bit",
  dequantized to fp32 (see export/dequantize.py).

`compare_merge_bases` measures which of the two reproduces the training-time model (4-bit base +
adapter, unmerged) more closely; merge base "auto" picks that one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flora.errors import ConfigError
from flora.modeling.loading import LoadedClip, load_clip

log = logging.getLogger(__name__)

MERGE_BASES = ("original", "dequantized-4bit", "auto")


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    return json.loads(config_path.read_text())


def _merge_into(clip: LoadedClip, adapter_dir: Path) -> LoadedClip:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(clip.model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    clip.model = merged
    return clip


def merge_adapter(base: str, adapter_dir: str | Path, *, merge_base: str = "original") -> LoadedClip:
    """Load the chosen fp32 base, apply the adapter with plain PEFT, and merge it into the weights."""
    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    if merge_base == "original":
        return _merge_into(load_clip(base, quantization="none", device="cpu"), adapter_dir)
    if merge_base == "dequantized-4bit":
        from export.dequantize import dequantized_4bit_base

        return _merge_into(dequantized_4bit_base(base), adapter_dir)
    raise ConfigError(f"merge base must be one of {', '.join(MERGE_BASES[:2])} here, got {merge_base!r}")


def compare_merge_bases(
    base: str, adapter_dir: str | Path, inputs: dict[str, Any], *, original: LoadedClip | None = None
) -> tuple[dict[str, Any], dict[str, LoadedClip]]:
    """Merge into both bases; report each one's max abs logit difference from the training-time model.

    Returns the report and both merged models, so the caller can export the closer one without
    loading it again. `original`: the adapter already merged into the original base, if at hand.
    """
    import torch

    from export.dequantize import dequantized_4bit_base, load_4bit, training_time_model

    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    quantized = load_4bit(base)
    merged = {
        "original": original or _merge_into(load_clip(base, quantization="none", device="cpu"), adapter_dir),
        "dequantized-4bit": _merge_into(dequantized_4bit_base(base, quantized), adapter_dir),
    }
    trained = training_time_model(adapter_dir, quantized)

    whole_model_inputs = (*merged["original"].family.text_input_names, "pixel_values")

    def outputs(model):  # logits and both embeddings, flattened into one vector
        with torch.no_grad():
            out = model(**{k: inputs[k] for k in whole_model_inputs})
        return torch.cat([out.logits_per_image.flatten(), out.text_embeds.flatten(), out.image_embeds.flatten()])

    reference = outputs(trained).float()
    diffs = {name: float((outputs(clip.model).float() - reference).abs().max()) for name, clip in merged.items()}
    closer = min(diffs, key=diffs.get)
    report = {
        "training_time_model": "4-bit NF4 base + adapter (unmerged), as clients with quantization='4bit' ran it",
        "compared": "max abs difference of logits_per_image, text_embeds and image_embeds on sample inputs",
        "max_abs_diff_vs_training_time": diffs,
        "closer": closer,
    }
    log.info("merge bases vs the 4-bit training-time model: %s; closer: %s", diffs, closer)
    return report, merged
