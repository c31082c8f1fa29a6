"""Merge a PEFT adapter into the full-precision base model.

Never into a quantized base: a bitsandbytes model cannot be exported to ONNX, and merging into
4-bit weights would round the adapter away. The base is loaded in fp32 through the same
`from_pretrained` path as everywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flora.errors import ConfigError
from flora.modeling.loading import LoadedClip, load_clip


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise ConfigError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    return json.loads(config_path.read_text())


def merge_adapter(base: str, adapter_dir: str | Path) -> LoadedClip:
    """Load `base` in fp32, apply the adapter with plain PEFT, and merge it into the weights."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    read_adapter_config(adapter_dir)
    clip = load_clip(base, quantization="none", device="cpu")
    merged = PeftModel.from_pretrained(clip.model, str(adapter_dir)).merge_and_unload()
    merged.eval()
    clip.model = merged
    return clip
