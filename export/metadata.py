"""Provenance written into every ONNX file: toolkit version, base model, recipe, adapter sha256.

An .onnx file copied to a device on its own still says what it is: any ONNX tool shows
these metadata_props, and ONNX Runtime returns them from `session.get_modelmeta()`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from flora import __version__
from flora.modeling.recipes import RECIPES


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def recipe_name(adapter_config: dict[str, Any]) -> str:
    """The registered recipe this adapter was built from, or 'custom' if none matches exactly."""
    for name, recipe in RECIPES.items():
        config = recipe.to_lora_config()  # as PEFT wrote it: target_modules of a recipe without LoRA is PEFT's dummy
        if (
            adapter_config.get("target_modules") == config.target_modules
            and sorted(adapter_config.get("modules_to_save") or []) == sorted(config.modules_to_save or [])
            and adapter_config.get("r") == recipe.rank
            and float(adapter_config.get("lora_alpha", -1)) == recipe.alpha
        ):
            return name
    return "custom"


def export_metadata(base: str, adapter_dir: Path, *, merge_base: str = "original") -> dict[str, str]:
    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return {
        "flora_version": __version__,
        "base_model": str(base),
        "merge_base": merge_base,
        "recipe": recipe_name(config),
        "adapter_sha256": file_sha256(adapter_dir / "adapter_model.safetensors"),
        "lora_rank": str(config.get("r")),
        "lora_alpha": str(config.get("lora_alpha")),
        "lora_target_modules": json.dumps(config.get("target_modules")),
    }


def stamp(proto: Any, metadata: dict[str, Any]) -> Any:
    """Set metadata_props on an onnx ModelProto, replacing keys already there (quantizers copy them)."""
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    for key, value in [*keep, *((k, str(v)) for k, v in metadata.items())]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto
