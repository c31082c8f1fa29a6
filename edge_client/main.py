"""Build and run the edge agent from its config (the body of `flora client`)."""

from __future__ import annotations

import logging

from edge_client.agent import EdgeAgent
from edge_client.config import ClientConfig
from edge_client.trainer import LocalTrainer
from flora.data.datasets import load_image_folder
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.transport import transport_for

log = logging.getLogger(__name__)


def build_agent(config: ClientConfig, *, progress: bool = True) -> EdgeAgent:
    data = load_image_folder(config.data_dir)
    if data.skipped:
        log.warning("%d unreadable images skipped in %s", data.skipped, config.data_dir)
    clip = load_clip(
        config.model, quantization=config.quantization, compute_dtype=config.compute_dtype, device=config.device
    )
    trainer = LocalTrainer(
        clip, get_recipe(config.recipe), data, seed=config.seed, max_batch_size=config.batch_size, progress=progress
    )
    transport = transport_for(config)
    return EdgeAgent(config, transport, trainer)


def run_client(config: ClientConfig, *, max_seconds: float | None = None) -> EdgeAgent:
    agent = build_agent(config)
    agent.run(max_seconds=max_seconds)
    return agent
