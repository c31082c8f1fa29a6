"""Build and run the edge agent from its config (the body of `flora client`)."""

from __future__ import annotations

import dataclasses
import logging

from edge_client.agent import EdgeAgent
from edge_client.config import ClientConfig
from edge_client.quantization import load_for_training
from edge_client.trainer import LocalTrainer
from flora.data.formats import load_local_data
from flora.files import check_writable
from flora.modeling.recipes import get_recipe
from flora.transport import transport_for

log = logging.getLogger(__name__)


def recipe_for(config: ClientConfig):
    """The recipe, at the device's own lower rank when `lora_rank` asks for one."""
    recipe = get_recipe(config.recipe)
    return recipe if config.lora_rank is None else dataclasses.replace(recipe, rank=config.lora_rank)


def build_agent(config: ClientConfig, *, progress: bool = True) -> EdgeAgent:
    config.check_files()  # a missing ca_file, named, before the model loads
    check_writable(config.state_dir, f"state_dir {config.state_dir}")  # progress must survive a reboot
    data = load_local_data(config.data_dir, config.data_format)
    if data.skipped:
        log.warning("%d unreadable images skipped in %s", data.skipped, config.data_dir)
    clip = load_for_training(config)  # the configured quantization, or a logged fallback without it
    trainer = LocalTrainer(
        clip,
        recipe_for(config),
        data,
        seed=config.seed,
        max_batch_size=config.batch_size,
        progress=progress,
        cache_dir=config.state_dir / "cache",
        cache_image_embeddings=config.cache_image_embeddings,
        cache_precision=config.cache_precision,
        release_vision_tower=config.release_vision_tower,
        memory_budget_mb=config.memory_budget_mb,
        gradient_checkpointing=config.gradient_checkpointing,
        autocast=config.autocast,
    )
    transport = transport_for(config)
    return EdgeAgent(config, transport, trainer)


def run_client(config: ClientConfig, *, max_seconds: float | None = None) -> EdgeAgent:
    agent = build_agent(config)
    agent.run(max_seconds=max_seconds)
    return agent
