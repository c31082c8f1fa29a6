"""Coordinator settings: `flora coordinator --config coordinator.toml`, FLORA_COORDINATOR_* overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from coordinator.objective import check_objective
from flora.algorithms import make_strategy, strategy_class, strategy_names
from flora.algorithms.registry import recipe_problem
from flora.config import field, load_config
from flora.errors import ConfigError
from flora.modeling.recipes import get_recipe
from flora.modeling.scoring import DEFAULT_TEMPLATE
from flora.protocol.schema import OPTIMIZERS
from flora.settings import NodeSettings

ENV_PREFIX = "FLORA_COORDINATOR_"


@dataclasses.dataclass(kw_only=True)
class CoordinatorConfig(NodeSettings):
    """The coordinator's settings: NodeSettings (identity, broker, wire, logging) plus its own."""

    model: str = field(help="CLIP checkpoint: hub id or local directory (the clients' base model)")
    node_id: str = field("coordinator", help="this coordinator's MQTT client id")
    signing_key: Path | None = field(
        None, help="coordinator's Ed25519 private key (PEM, `flora provision`): signs what it publishes"
    )
    device_keys_dir: Path | None = field(
        None, help="devices' Ed25519 public keys, NODE_ID.pub (`flora provision`): updates are verified against them"
    )
    require_signatures: bool | None = field(
        None, help="reject unsigned updates and statuses (default: true when device_keys_dir is set)"
    )
    recipe: str = field("paper", help="LoRA recipe every client uses")
    rounds: int = field(10, help="number of federated rounds")
    clients_per_round_fraction: float = field(1.0, help="fraction of online clients selected per round")
    min_clients_per_round: int = field(1, help="select at least this many clients")
    min_available_clients: int = field(1, help="wait until this many clients are online before a round")
    min_client_memory_mb: float | None = field(None, help="select only clients announcing this much free memory")
    require_4bit: bool = field(False, help="select only clients whose bitsandbytes 4-bit check passed")
    quorum: int = field(1, help="minimum accepted updates to aggregate a round")
    round_deadline_s: float = field(300.0, help="seconds a round waits for updates")
    wait_for_clients_s: float = field(600.0, help="seconds to wait for min_available_clients")
    max_round_attempts: int = field(3, help="retries (fresh selection) of a round below quorum")
    presence_timeout_s: float = field(
        30.0,
        help="after start and every reconnect the clients are asked for a fresh status; those silent this long "
        "are counted offline (a broker restart may have lost their Last Wills)",
    )
    strategy: str = field(
        "fedavg",
        help="aggregation strategy: " + ", ".join(strategy_names()) + ", or a name from register_strategy / a plugin",
    )
    strategy_params: dict = field(
        factory=dict, help="strategy parameters, e.g. {mu = 0.01}; clip_norm adds clipping, noise_multiplier central DP"
    )
    local_epochs: float = field(
        1,
        help="local epochs per round; a fraction (e.g. 0.25: a quarter of each client's data a round) needs clients "
        "of protocol 1.3",
    )
    client_optimizer: str = field(
        "adamw",
        help="clients' local optimizer: adamw (the paper's) or sgd (plain SGD, no momentum: the clients' steps then "
        "average into the pooled data's gradient; pair it with a server optimizer, fedavgm or fedadam, and an SGD "
        "learning rate). sgd needs clients of protocol 1.3",
    )
    learning_rate: float = field(5e-5, help="clients' learning rate (paper: AdamW at 5e-5)")
    weight_decay: float = field(0.2, help="clients' weight decay (paper: 0.2)")
    batch_size: int = field(128, help="clients' batch size (paper: 128); clients may lower it")
    prompt_template: str = field(DEFAULT_TEMPLATE, help="class prompt; {label} is the class name")
    objective: str = field(
        "in-batch",
        help="clients' local loss: in-batch (CLIP's loss over the batch's own texts, the paper's; caption data always "
        "uses it) or class-prompts (each image against every class prompt of the run, sent in the instruction). "
        "in-batch stays the default: EXPERIMENTS.md measures class-prompts no better under label skew",
    )
    logit_calibration: float = field(
        0.0,
        help="with objective = class-prompts: FedLC's tau, each class's logit lowered by tau * n^(-1/4) during "
        "local training (n its local count), against label skew; 0 = off",
    )
    class_names: list[str] = field(
        factory=list, help="the run's class names for the class-prompts objective (default: eval_data_dir's classes)"
    )
    max_update_norm: float | None = field(None, help="reject updates whose change has a larger L2 norm")
    max_weight_factor: float | None = field(
        10.0,
        help="cap an update's FedAvg weight at its announced dataset_size and at this many times the selected "
        "nodes' median (none: weight = num_examples as claimed)",
    )
    checkpoint_dir: Path = field(Path("flora-checkpoints"), help="state for resuming after a crash")
    output_dir: Path | None = field(None, help="report.json, metrics.png, global_adapter/ (default: checkpoint_dir)")
    eval_data_dir: Path | None = field(None, help="held-out image folder for server-side evaluation")
    export_dir: Path | None = field(None, help="after the last round, merge and export validated ONNX here")
    trackers: list[str] = field(
        factory=list, help='experiment trackers: tensorboard, mlflow (extras: pip install "flora-edge[tensorboard]")'
    )
    tracker_dir: Path | None = field(None, help="tracker logs: tensorboard/, mlflow.db (default: output_dir/trackers)")
    mlflow_tracking_uri: str | None = field(None, help="MLflow tracking URI (default: sqlite in tracker_dir)")
    device: str = field("cpu", help="device for evaluation: cpu, cuda, auto")
    seed: int = field(0, help="seeds client selection and the initial adapter")

    def __post_init__(self):
        super().__post_init__()
        get_recipe(self.recipe)
        # Against the live registry: a strategy registered (or installed as a plugin) after import counts.
        try:
            strategy_class(self.strategy)  # loads an installed plugin's entry point on first use
        except ValueError as exc:
            raise ConfigError(f"strategy: {exc}") from None
        try:
            make_strategy(self.strategy, self.strategy_params)
        except ValueError as exc:
            raise ConfigError(f"strategy_params: {exc}") from None
        recipe = get_recipe(self.recipe)
        problem = recipe_problem(self.strategy, recipe)
        if problem:
            raise ConfigError(problem)
        if self.require_4bit and recipe.modules_to_save:
            raise ConfigError(
                f"require_4bit selects only 4-bit clients, and recipe {self.recipe!r} trains whole modules, which "
                "a quantized base cannot: set require_4bit = false, or use a LoRA recipe"
            )
        checks = [
            (self.rounds >= 1, "rounds must be >= 1"),
            (0 < self.clients_per_round_fraction <= 1, "clients_per_round_fraction must be in (0, 1]"),
            (self.min_clients_per_round >= 1, "min_clients_per_round must be >= 1"),
            (self.min_available_clients >= 1, "min_available_clients must be >= 1"),
            (self.quorum >= 1, "quorum must be >= 1"),
            (
                self.quorum <= max(self.min_clients_per_round, self.min_available_clients),
                "quorum cannot exceed the clients a round is guaranteed (raise min_clients_per_round)",
            ),
            (self.round_deadline_s > 0, "round_deadline_s must be > 0"),
            (self.max_round_attempts >= 1, "max_round_attempts must be >= 1"),
            (self.presence_timeout_s > 0, "presence_timeout_s must be > 0"),
            (self.local_epochs > 0, "local_epochs must be > 0 (a fraction trains part of an epoch a round)"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.client_optimizer in OPTIMIZERS, f"client_optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            ("{label}" in self.prompt_template, "prompt_template must contain {label}"),
            (self.max_update_norm is None or self.max_update_norm > 0, "max_update_norm must be > 0"),
            (
                self.max_weight_factor is None or 1 <= self.max_weight_factor <= 1e6,
                "max_weight_factor must be between 1 and 1e6 (or none to turn the cap off)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_objective(self.objective, self.class_names)
        if not 0 <= self.logit_calibration <= 100:
            raise ConfigError(f"logit_calibration must be in [0, 100], got {self.logit_calibration}")
        if self.output_dir is None:
            self.output_dir = self.checkpoint_dir
        if self.require_signatures is None:
            self.require_signatures = self.device_keys_dir is not None
        if self.require_signatures and self.device_keys_dir is None:
            raise ConfigError("require_signatures needs device_keys_dir: the devices' public keys (`flora provision`)")


def load_coordinator_config(path: str | Path | None = None, **overrides) -> CoordinatorConfig:
    return load_config(CoordinatorConfig, path, env_prefix=ENV_PREFIX, overrides=overrides)
