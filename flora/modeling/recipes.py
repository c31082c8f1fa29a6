"""Recipes: which modules train, and how. Registered by name.

A recipe is the contract between coordinator and clients: both build the same adapter from
it, so tensor names and shapes can be validated on every update. Two ways to train a module, both
PEFT's, so what travels is always "the adapter state" and every path (validation, aggregation,
checkpoints, export's merge_and_unload) works by tensor name and shape:

- `target_modules`: LoRA factors (A, B) beside the frozen module (the paper's way);
- `modules_to_save`: a full trainable copy of the whole module (PEFT's modules_to_save). The paper's
  non-LoRA baselines are built this way: full fine-tuning (`fedfft`), a linear probe on frozen image
  features (`linear-probe`), the vision encoder with that linear head (`vision-head`).
"""

from __future__ import annotations

import dataclasses
import re

from flora.config import field
from flora.errors import ConfigError

# The built-in recipes' targets: module names CLIP and SigLIP share (families.base.ModelFamily.recipe_targets).
from flora.modeling.families.base import FAMILIES, TEXT_ATTENTION_AND_MLP, TEXT_OUT_PROJ, VISION_ATTENTION

# Module names (Hugging Face's CLIPModel) the baselines train whole. CLIP-only: SigLIP has no visual_projection,
# and attach_lora names a module a model lacks instead of training nothing.
CLIP_VISION_TOWER = "vision_model"
CLIP_IMAGE_HEAD = "visual_projection"  # the linear map from the vision tower's pooled output to the joint space
# Every text module but the token-embedding table: a prompt uses a handful of its rows, AdamW's weight decay would
# shrink all the others every step, and on ViT-B/32 it is 25M of the 151M parameters. (logit_scale, a bare
# parameter of CLIPModel and no module, cannot be a modules_to_save entry: it stays frozen too.)
CLIP_TEXT_TOWER = (
    "text_model.embeddings.position_embedding",
    "text_model.encoder",
    "text_model.final_layer_norm",
    "text_projection",
)


@dataclasses.dataclass(frozen=True)
class LoraRecipe:
    name: str = field(help="registry name")
    rank: int = field(2, help="LoRA rank r")
    alpha: float = field(32.0, help="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = field(0.0, help="dropout on the LoRA input")
    target_modules: str | None = field(
        TEXT_OUT_PROJ, help="regex over module names that get LoRA adapters; None: no LoRA layers"
    )
    modules_to_save: tuple[str, ...] = field(
        (), help="module names (dotted paths in the base model) trained whole: their full weights are the update"
    )
    description: str = field("", help="one line for humans")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"recipe {self.name!r}: rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"recipe {self.name!r}: alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"recipe {self.name!r}: dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is None and not self.modules_to_save:
            raise ConfigError(f"recipe {self.name!r} trains nothing: set target_modules or modules_to_save")
        if self.target_modules is not None:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ConfigError(f"recipe {self.name!r}: target_modules is not a valid regex: {exc}") from None
        if isinstance(self.modules_to_save, str) or not all(self.modules_to_save):
            raise ConfigError(f"recipe {self.name!r}: modules_to_save must be a tuple of module names")

    @property
    def has_lora(self) -> bool:
        """Whether the update holds LoRA factors (strategies acting on A and B need some)."""
        return self.target_modules is not None

    @property
    def trains_vision_tower(self) -> bool:
        """True if anything on the image path trains, LoRA or whole modules (then image embeddings cannot be
        cached). A hint from names, each registered family's image-path modules: the trainer decides from the
        built model's trainable parameters."""
        targets = [self.target_modules or "", *self.modules_to_save]
        return any(family.on_image_path(target) for family in FAMILIES.values() for target in targets)

    def to_lora_config(self):
        from peft import LoraConfig
        from peft.utils.constants import DUMMY_TARGET_MODULES

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            # PEFT's own "no LoRA layer" value (X-LoRA uses it): the adapter is then its modules_to_save alone.
            target_modules=self.target_modules if self.target_modules is not None else DUMMY_TARGET_MODULES,
            modules_to_save=list(self.modules_to_save) or None,
            bias="none",
        )


RECIPES: dict[str, LoraRecipe] = {}


def register_recipe(recipe: LoraRecipe) -> LoraRecipe:
    RECIPES[recipe.name] = recipe
    return recipe


register_recipe(
    LoraRecipe(
        name="paper",
        rank=2,
        alpha=32.0,
        target_modules=TEXT_OUT_PROJ,
        description="FLoRA paper: r=2, alpha=32 on out_proj of every text-encoder layer; vision frozen",
    )
)
register_recipe(
    LoraRecipe(
        name="text-full",
        rank=8,
        alpha=16.0,
        target_modules=TEXT_ATTENTION_AND_MLP,
        description="r=8 on every attention and MLP projection of the text encoder; vision frozen",
    )
)
register_recipe(
    LoraRecipe(
        name="both-towers",
        rank=8,
        alpha=16.0,
        target_modules=f"({TEXT_ATTENTION_AND_MLP}|{VISION_ATTENTION})",
        description="r=8 on the text encoder and on the vision encoder's attention (for randomly initialised towers)",
    )
)


# The paper's non-LoRA baselines (its comparison table). rank and alpha do not apply (no LoRA layers); they stay
# at 1 so the status's `rank` field, which the coordinator compares, is the same on both sides.
register_recipe(
    LoraRecipe(
        name="fedfft",
        rank=1,
        alpha=1.0,
        target_modules=None,
        modules_to_save=(CLIP_VISION_TOWER, CLIP_IMAGE_HEAD, *CLIP_TEXT_TOWER),
        description="full fine-tuning (FedFFT): every weight of both towers and both projections trains, except "
        "the token-embedding table and logit_scale; CLIP only",
    )
)
register_recipe(
    LoraRecipe(
        name="linear-probe",
        rank=1,
        alpha=1.0,
        target_modules=None,
        modules_to_save=(CLIP_IMAGE_HEAD,),
        description="linear probe (FedLC): only visual_projection, a linear map on the frozen image features, "
        "trains; classes are scored against the frozen class-prompt text embeddings; CLIP only",
    )
)
register_recipe(
    LoraRecipe(
        name="vision-head",
        rank=1,
        alpha=1.0,
        target_modules=None,
        modules_to_save=(CLIP_VISION_TOWER, CLIP_IMAGE_HEAD),
        description="the vision encoder plus the linear head (visual_projection) train in full; text frozen; CLIP only",
    )
)


def get_recipe(name: str) -> LoraRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}") from None
