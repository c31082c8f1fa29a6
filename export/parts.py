"""What can be exported, declared once: each part's file name, inputs, outputs and dynamic axes.

Like optimum's OnnxConfig, an export is described by data rather than by code paths, so the
exporter, the validator, the quantizer and the torch-free runtime all read the same table.
Names follow the Hugging Face / optimum conventions. This module imports nothing heavy: the
inference path (`flora infer`) reads it without PyTorch installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from flora.errors import ConfigError

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


_TEXT_AXES = {"input_ids": {0: "text_batch", 1: "sequence"}, "attention_mask": {0: "text_batch", 1: "sequence"}}
_IMAGE_AXES = {"pixel_values": {0: "image_batch"}}

WHOLE_MODEL = OnnxPart(
    name="model",
    stem="model",
    inputs=("input_ids", "attention_mask", "pixel_values"),
    outputs=("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"),
    dynamic_axes={
        **_TEXT_AXES,
        **_IMAGE_AXES,
        "logits_per_image": {0: "image_batch", 1: "text_batch"},
        "logits_per_text": {0: "text_batch", 1: "image_batch"},
        "text_embeds": {0: "text_batch"},
        "image_embeds": {0: "image_batch"},
    },
    description="the whole CLIPModel: both towers and the scaled similarity logits",
)
VISION_TOWER = OnnxPart(
    name="vision",
    stem="vision_model",
    inputs=("pixel_values",),
    outputs=("image_embeds",),
    dynamic_axes={**_IMAGE_AXES, "image_embeds": {0: "image_batch"}},
    description="image tower + visual projection, L2-normalised (CLIPModel's image_embeds)",
)
TEXT_TOWER = OnnxPart(
    name="text",
    stem="text_model",
    inputs=("input_ids", "attention_mask"),
    outputs=("text_embeds",),
    dynamic_axes={**_TEXT_AXES, "text_embeds": {0: "text_batch"}},
    description="text tower + text projection, L2-normalised (CLIPModel's text_embeds)",
)

PARTS: dict[str, OnnxPart] = {part.name: part for part in (WHOLE_MODEL, VISION_TOWER, TEXT_TOWER)}


def get_part(name: str) -> OnnxPart:
    try:
        return PARTS[name]
    except KeyError:
        raise ConfigError(f"unknown part {name!r}; choose from: {', '.join(PARTS)}") from None


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
