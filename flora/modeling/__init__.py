"""Model loading (any registered family: CLIP, SigLIP), quantization, LoRA recipes and adapter tensors.

Knows nothing of federation. Names are imported on first use (torch is only needed once a model loads).
"""

from flora.lazy_exports import lazy_exports

_EXPORTS = {
    "LoadedModel": "flora.modeling.loading",
    "load_model": "flora.modeling.loading",
    "LoraRecipe": "flora.modeling.recipes",
    "get_recipe": "flora.modeling.recipes",
    "register_recipe": "flora.modeling.recipes",
    "ModelFamily": "flora.modeling.families",
    "register_family": "flora.modeling.families",
    "get_family": "flora.modeling.families",
    "family_for": "flora.modeling.families",
    "attach_lora": "flora.modeling.adapter",
    "get_adapter_state": "flora.modeling.adapter",
    "set_adapter_state": "flora.modeling.adapter",
    "save_adapter_dir": "flora.modeling.adapter",
    "write_tiny_clip": "flora.modeling.tiny",
    "write_tiny_siglip": "flora.modeling.families",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
