"""LoRA recipes: which modules get adapters, with what rank and scale. Registered by name.

A recipe is the contract between coordinator and clients: both build the same adapter from
it, so tensor names and shapes can be validated on every update.
"""

from __future__ import annotations

import dataclasses
import re

from flora.config import field
from flora.errors import ConfigError

# The built-in recipes' targets: module names CLIP and SigLIP share (families.base.ModelFamily.recipe_targets).
from flora.modeling.families.base import TEXT_ATTENTION_AND_MLP, TEXT_OUT_PROJ, VISION_ATTENTION


@dataclasses.dataclass(frozen=True)
class LoraRecipe:
    name: str = field(help="registry name")
    rank: int = field(2, help="LoRA rank r")
    alpha: float = field(32.0, help="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = field(0.0, help="dropout on the LoRA input")
    target_modules: str = field(TEXT_OUT_PROJ, help="regex over module names that get adapters")
    description: str = field("", help="one line for humans")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"recipe {self.name!r}: rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"recipe {self.name!r}: alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"recipe {self.name!r}: dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.target_modules)
        except re.error as exc:
            raise ConfigError(f"recipe {self.name!r}: target_modules is not a valid regex: {exc}") from None

    @property
    def trains_vision_tower(self) -> bool:
        """True if any adapter sits in the vision tower (then image embeddings cannot be cached)."""
        return "vision_model" in self.target_modules

    def to_lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
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


def get_recipe(name: str) -> LoraRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(sorted(RECIPES))}") from None
