"""What can be exported, declared once: each part's file name, inputs, outputs and dynamic axes.

Like optimum's OnnxConfig, an export is described by data rather than by code paths, so the
exporter, the validator, the quantizer and the torch-free runtime all read the same table.
Names follow the Hugging Face / optimum conventions. Each model family describes its parts
(SigLIP's text side takes no attention mask); `parts_for(family)` turns that into OnnxParts. This
module imports nothing heavy: the inference path (`flora infer`) reads it without PyTorch installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from flora.errors import ConfigError
from flora.modeling.families import CLIP, ModelFamily

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class OnnxPart:
    name: str  # what a user types: --parts model,vision,text
    stem: str  # file name without precision suffix or extension
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    description: str

    def filename(self, precision: str) -> str:
        """model.onnx, model_fp16.onnx, vision_model_int8.onnx, ... (transformers.js-style suffixes)."""
        check_precision(precision)
        return f"{self.stem}.onnx" if precision == "fp32" else f"{self.stem}_{precision}.onnx"

    @property
    def needs_text(self) -> bool:
        return "input_ids" in self.inputs

    @property
    def needs_images(self) -> bool:
        return "pixel_values" in self.inputs


def parts_for(family: ModelFamily) -> dict[str, OnnxPart]:
    """The exportable parts of `family`'s models, by name (model, vision, text)."""
    return {spec["name"]: OnnxPart(**spec) for spec in family.onnx_parts()}


# CLIP's parts. Every family offers the same part names, so these also list what --parts accepts.
PARTS: dict[str, OnnxPart] = parts_for(CLIP)
WHOLE_MODEL, VISION_TOWER, TEXT_TOWER = PARTS["model"], PARTS["vision"], PARTS["text"]


def get_part(name: str, family: ModelFamily = CLIP) -> OnnxPart:
    parts = parts_for(family)
    try:
        return parts[name]
    except KeyError:
        raise ConfigError(f"unknown part {name!r}; choose from: {', '.join(parts)}") from None


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from: {', '.join(PRECISIONS)}")
    return precision


def parse_list(text: str | list[str] | tuple[str, ...], allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """'model, vision' -> ('model', 'vision'), checked against `allowed`, duplicates dropped, order kept."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else [str(s).strip() for s in text]
    items = [s for s in items if s]
    if not items:
        raise ConfigError(f"no {what} given; choose one or more of: {', '.join(allowed)}")
    unknown = [s for s in items if s not in allowed]
    if unknown:
        raise ConfigError(f"unknown {what} {', '.join(map(repr, unknown))}; choose from: {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))
