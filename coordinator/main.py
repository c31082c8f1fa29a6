"""Build and run the coordinator from its config (the body of `flora coordinator`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.evaluation import Evaluator
from coordinator.server import Coordinator
from coordinator.trackers import make_tracker
from flora.algorithms import make_strategy
from flora.data.datasets import load_image_folder
from flora.errors import ConfigError
from flora.modeling.adapter import adapter_parameters
from flora.modeling.loading import load_clip
from flora.modeling.recipes import get_recipe
from flora.protocol.reassembly import ChunkLimits
from flora.protocol.wire_settings import adapter_size_problem, concurrent_uploads
from flora.transport import transport_for

log = logging.getLogger(__name__)


def build_coordinator(config: CoordinatorConfig, subscribers: Iterable[Any] = ()) -> Coordinator:
    """The coordinator the config describes; `subscribers` follow its events after the configured trackers."""
    trackers = [make_tracker(name, config) for name in config.trackers]  # a missing extra fails before loading
    config.check_files()  # a missing ca_file, named, before minutes of model loading
    data = load_image_folder(config.eval_data_dir) if config.eval_data_dir else None
    clip = load_clip(config.model, device=config.device)
    evaluator = Evaluator(clip, get_recipe(config.recipe), data, template=config.prompt_template, seed=config.seed)
    parameters = adapter_parameters(evaluator.model)
    problem = adapter_size_problem(parameters, encoding=config.wire_encoding, recipe=config.recipe)
    if problem:  # every round's adapter would be refused by the clients: say so before the run starts
        raise ConfigError(problem)
    warn_if_few_concurrent_uploads(parameters, config)
    transport = transport_for(config)
    strategy = make_strategy(config.strategy, config.strategy_params)
    return Coordinator(config, transport, evaluator, strategy, subscribers=[*trackers, *subscribers])


FEW_CONCURRENT_UPLOADS = 16  # below this many updates reassembled at once, a fleet's uploads may overlap it


def warn_if_few_concurrent_uploads(parameters: int, config: CoordinatorConfig) -> int:
    """Say at start when only a few clients' chunked updates fit the reassembly buffer at once; returns how many."""
    limit = ChunkLimits().max_buffered_bytes
    uploads = concurrent_uploads(parameters, encoding=config.wire_encoding, buffered_bytes=limit)
    if uploads < FEW_CONCURRENT_UPLOADS:
        log.warning(
            "recipe %r sends %s values per update as %s: the coordinator reassembles at most %d chunked updates at "
            "once (a %d MiB buffer, flora.protocol.reassembly.ChunkLimits); when more clients upload together the "
            "oldest partial uploads are dropped. Select fewer clients per round (clients_per_round_fraction), set "
            "wire_encoding = int8-channel, or use a LoRA recipe",
            config.recipe,
            f"{parameters:,}",
            config.wire_encoding,
            uploads,
            limit // 2**20,
        )
    return uploads


def run_coordinator(config: CoordinatorConfig) -> dict[str, Any]:
    return build_coordinator(config).run()
