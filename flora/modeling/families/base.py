"""The seam between the toolkit and a model family (CLIP, SigLIP, ...): one adapter object per family.

Everything that differs between dual-encoder families lives behind `ModelFamily`: which transformers
class to load, how text is tokenized, how embeddings become logits and a training loss, which modules
form the image path, how the ONNX parts are shaped, what the torch-free preprocessing defaults are,
and how to write a tiny random checkpoint for tests. The rest of the toolkit asks the family and never
names one, so a new family is one new module in this package (docs/FAMILIES.md).

This module imports nothing heavy: `flora infer` (no PyTorch) reads families' ONNX and preprocessing
descriptions. torch and transformers are imported inside the methods that need them.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from flora.errors import ConfigError

# Module-name regexes the built-in recipes use. CLIP and SigLIP share Hugging Face's layer names
# (text_model.encoder.layers.N.self_attn.out_proj, ...); a family with other names declares its own.
TEXT_OUT_PROJ = r".*text_model\.encoder\.layers\.\d+\.self_attn\.out_proj"
TEXT_ATTENTION_AND_MLP = r".*text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc\d)"
VISION_ATTENTION = r".*vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj|out_proj)"

_TEXT_AXES = {"input_ids": {0: "text_batch", 1: "sequence"}, "attention_mask": {0: "text_batch", 1: "sequence"}}
_IMAGE_AXES = {"pixel_values": {0: "image_batch"}}


def _normalize(x):
    return x / x.norm(p=2, dim=-1, keepdim=True)


class ModelFamily(ABC):
    """One dual-encoder family. Subclasses set the class attributes and implement `loss` and `write_tiny`."""

    name: ClassVar[str]  # registry key, also written into export manifests
    model_types: ClassVar[tuple[str, ...]]  # config.json `model_type` values this family loads
    model_class_name: ClassVar[str]  # the transformers class, e.g. "CLIPModel"
    # Top-level modules an image embedding depends on: frozen, they let the image side be cached
    # (edge_client.cache) and a cache-only client may drop them.
    image_path_modules: ClassVar[tuple[str, ...]]
    # Names of the text inputs the model takes (and the ONNX text/whole-model parts declare).
    text_input_names: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
    # "longest": pad to the longest prompt of the batch; "max_length": always to the text tower's
    # length (a tower that pools the last position needs every prompt padded the same way).
    text_padding: ClassVar[str] = "longest"
    # transformers' image-processor defaults for keys a saved config leaves out (export/preprocess.py).
    preprocessing_defaults: ClassVar[Mapping[str, Any]] = {}
    # The regexes the built-in recipes target, by role; see TEXT_OUT_PROJ above.
    recipe_targets: ClassVar[Mapping[str, str]] = {
        "text_out_proj": TEXT_OUT_PROJ,
        "text_attention_and_mlp": TEXT_ATTENTION_AND_MLP,
        "vision_attention": VISION_ATTENTION,
    }

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # -- loading --------------------------------------------------------------------------------
    def model_class(self):
        import transformers

        return getattr(transformers, self.model_class_name)

    def from_pretrained(self, name: str, **kwargs: Any) -> tuple[Any, Any]:
        """(model, processor) through `from_pretrained`: the same path for hub ids and local directories."""
        from transformers import AutoProcessor

        return self.model_class().from_pretrained(name, **kwargs), AutoProcessor.from_pretrained(name)

    # -- text -----------------------------------------------------------------------------------
    def tokenize(self, tokenizer: Any, texts: Sequence[str], device: str = "cpu") -> dict[str, Any]:
        """The model's text inputs (only those in `text_input_names`) for `texts`, on `device`."""
        if self.text_padding == "max_length":
            enc = tokenizer(
                list(texts),
                padding="max_length",
                truncation=True,
                max_length=tokenizer.model_max_length,
                return_tensors="pt",
            )
        else:
            enc = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return {name: enc[name].to(device) for name in self.text_input_names}

    def text_rows(self, text_inputs: dict[str, Any], ids) -> dict[str, Any]:
        """Rows `ids` of tokenized texts, ready to embed. Padding to the longest drops columns no row uses."""
        rows = {k: v[ids] for k, v in text_inputs.items()}
        if self.text_padding == "longest" and "attention_mask" in rows:
            length = int(rows["attention_mask"].sum(dim=1).max())
            rows = {k: v[:, :length] for k, v in rows.items()}
        return rows

    # -- embeddings and logits ------------------------------------------------------------------
    def text_embeddings(self, model: Any, text_inputs: dict[str, Any]):
        """L2-normalised projected text embeddings, fp32 (transformers 5 returns an output object)."""
        out = model.get_text_features(**text_inputs)
        return _normalize(out.pooler_output.float())

    def image_embeddings(self, model: Any, pixel_values):
        """L2-normalised projected image embeddings, fp32."""
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        out = model.get_image_features(pixel_values=pixel_values.to(dtype))
        return _normalize(out.pooler_output.float())

    def logit_scale(self, model: Any):
        """The multiplier of cosine similarity (stored as a log, applied exp()'d)."""
        return model.logit_scale.exp().float()

    def logit_bias(self, model: Any):
        """The additive logit bias, or None for a family without one."""
        return None

    def logits(self, image_embeds, text_embeds, scale, bias=None):
        """logits_per_image [images, texts] as the model's forward computes them."""
        logits = scale * image_embeds @ text_embeds.t()
        return logits if bias is None else logits + bias

    @abstractmethod
    def loss(self, image_embeds, text_embeds, targets, scale, bias=None):
        """The family's training loss. `text_embeds` holds each distinct text once; `targets[i]` is the
        text index of image i (several images may share a text)."""

    # -- image path -----------------------------------------------------------------------------
    def image_path(self, model: Any) -> list[tuple[str, Any]]:
        """(name, module) of each image-path module of a loaded model (a PeftModel is unwrapped)."""
        base = getattr(model, "get_base_model", lambda: model)()
        return [(name, getattr(base, name)) for name in self.image_path_modules]

    def on_image_path(self, parameter_name: str) -> bool:
        return any(module in parameter_name for module in self.image_path_modules)

    # -- ONNX and torch-free inference -----------------------------------------------------------
    def onnx_parts(self) -> list[dict[str, Any]]:
        """The exportable parts: name, file stem, inputs, outputs, dynamic axes, description."""
        text_axes = {k: v for k, v in _TEXT_AXES.items() if k in self.text_input_names}
        return [
            {
                "name": "model",
                "stem": "model",
                "inputs": (*self.text_input_names, "pixel_values"),
                "outputs": ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"),
                "dynamic_axes": {
                    **text_axes,
                    **_IMAGE_AXES,
                    "logits_per_image": {0: "image_batch", 1: "text_batch"},
                    "logits_per_text": {0: "text_batch", 1: "image_batch"},
                    "text_embeds": {0: "text_batch"},
                    "image_embeds": {0: "image_batch"},
                },
                "description": f"the whole {self.model_class_name}: both towers and the similarity logits",
            },
            {
                "name": "vision",
                "stem": "vision_model",
                "inputs": ("pixel_values",),
                "outputs": ("image_embeds",),
                "dynamic_axes": {**_IMAGE_AXES, "image_embeds": {0: "image_batch"}},
                "description": f"image tower with its head, L2-normalised ({self.model_class_name}'s image_embeds)",
            },
            {
                "name": "text",
                "stem": "text_model",
                "inputs": self.text_input_names,
                "outputs": ("text_embeds",),
                "dynamic_axes": {**text_axes, "text_embeds": {0: "text_batch"}},
                "description": f"text tower with its head, L2-normalised ({self.model_class_name}'s text_embeds)",
            },
        ]

    # -- tests and demos ------------------------------------------------------------------------
    @abstractmethod
    def write_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        """Write a tiny, randomly initialised checkpoint that loads back through `from_pretrained`."""


FAMILIES: dict[str, ModelFamily] = {}
_BY_MODEL_TYPE: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make `family` known by its name and by each of its config `model_type`s."""
    FAMILIES[family.name] = family
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    return family


def get_family(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; choose one of: {', '.join(sorted(FAMILIES))}") from None


def family_for(model_or_config: Any) -> ModelFamily:
    """The family of a model, a transformers config, a config dict, or a checkpoint directory.

    Detected from the config's `model_type`; a directory is read from its config.json, so no weights load.
    """
    model_type = _model_type(model_or_config)
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_BY_MODEL_TYPE))
        raise ConfigError(
            f"model type {model_type!r} belongs to no registered model family (known: {known}); point the config at "
            "a checkpoint of one of those, or add a family (docs/FAMILIES.md)"
        ) from None


def _model_type(obj: Any) -> str | None:
    if isinstance(obj, (str, Path)):
        path = Path(obj) / "config.json"
        if path.is_file():
            return json.loads(path.read_text()).get("model_type")
        from transformers import AutoConfig  # a hub id (or a cached one): its config only, no weights

        try:
            return AutoConfig.from_pretrained(str(obj)).model_type
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load checkpoint {str(obj)!r}: {exc}. Pass a local directory written by "
                "save_pretrained, or a hub id reachable from this machine."
            ) from None
    if isinstance(obj, Mapping):
        return obj.get("model_type")
    config = getattr(obj, "config", obj)
    return getattr(config, "model_type", None)
