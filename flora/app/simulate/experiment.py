"""An experiment: the settings every cell shares, and the axes whose product is the grid.

    flora simulate --config experiment.toml

A cell is one (recipe, split, strategy, objective, seed). Its key names it in file names, so a finished cell
is found again after an interruption and never re-run.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

from flora.algorithms import make_strategy
from flora.algorithms.registry import recipe_problem
from flora.config import field, load_config
from flora.errors import ConfigError
from flora.modeling.recipes import get_recipe
from flora.protocol.schema import OPTIMIZERS

ENV_PREFIX = "FLORA_SIMULATE_"
OBJECTIVES = ("class-prompts", "in-batch", "class-prompts-lc")  # -lc: with FedLC's logit calibration
_SPLIT = re.compile(
    r"^(centralized|iid|dirichlet-(?P<beta>\d+(\.\d+)?)|pathological-(?P<k>\d+)|few-shot-(?P<shots>\d+))$"
)


@dataclasses.dataclass(kw_only=True)
class ExperimentConfig:
    """What every cell shares; the lists are the grid's axes."""

    name: str = field("experiment", help="names the results")
    out: Path = field(Path("experiments/out"), help="results: cells/, results.csv, results.json, table.md, plots/")
    model: str = field("tiny", help="base checkpoint directory, 'tiny' (random tiny CLIP) or 'pretrained-digits'")
    dataset: str = field("digits", help="digits (scikit-learn's), or an image folder with one subfolder per class")
    data_format: str = field("image-folder", help="format of dataset and test_dataset paths: image-folder, hf-dataset")
    test_dataset: str | None = field(None, help="a separate test set, same format (default: test_fraction of dataset)")
    test_fraction: float = field(0.2, help="share of the dataset held out for test (stratified, seeded)")
    validation_fraction: float = field(0.1, help="share of the training data held out to choose settings")
    clients: int = field(10, help="virtual clients per cell")
    rounds: int = field(8, help="federated rounds per cell")
    local_epochs: float = field(
        1, help="local epochs per round; a fraction (0.25) spreads the same total epochs over more, shorter rounds"
    )
    batch_size: int = field(32, help="clients' batch size")
    client_optimizer: str = field("adamw", help="clients' optimizer: adamw or sgd (for a server optimizer)")
    learning_rate: float = field(5e-3, help="clients' learning rate")
    weight_decay: float = field(0.2, help="clients' weight decay")
    prompt_template: str = field("a photo of the digit {label}.", help="class prompt; {label} is the class name")
    wire_encoding: str = field("float32", help="adapter encoding on the wire")
    device: str = field("cpu", help="cpu or cuda")
    threads: int = field(
        1, help="torch CPU threads; 1 on a shared machine, where a second OpenMP thread stalls on a busy core"
    )
    recipes: list[str] = field(
        factory=lambda: ["paper"],
        help="recipes (flora.modeling.recipes): LoRA ones, or the baselines fedfft, linear-probe, vision-head",
    )
    splits: list[str] = field(
        factory=lambda: ["iid", "dirichlet-0.1"],
        help="iid, dirichlet-BETA, pathological-K, few-shot-K, or centralized (one client holding all the data: "
        "the reference, same rounds x local epochs)",
    )
    strategies: list[str] = field(
        factory=lambda: ["fedavg"],
        help="strategy names (flora.algorithms); NAME@VARIANT runs NAME with strategy_params['NAME@VARIANT']",
    )
    strategy_params: dict = field(
        factory=dict, help='per strategy (or variant), its parameters: {fedprox = {mu = 0.01}, "fedavgm@0.9" = {...}}'
    )
    objectives: list[str] = field(
        factory=lambda: ["class-prompts"],
        help="class-prompts, in-batch, class-prompts-lc (class prompts with FedLC's logit calibration)",
    )
    logit_calibration: float = field(1.0, help="FedLC's tau for the class-prompts-lc objective")
    seeds: list[int] = field(factory=lambda: [0], help="seeds: data split, selection, initial adapter")

    def __post_init__(self):
        if float(self.local_epochs).is_integer():  # reports write 1, not 1.0, as before fractions
            self.local_epochs = int(self.local_epochs)
        for recipe in self.recipes:
            get_recipe(recipe)
        for split in self.splits:
            split_kwargs(split)
        for strategy in self.strategies:
            try:
                make_strategy(strategy_name(strategy), self.params_of(strategy))
            except ValueError as exc:
                raise ConfigError(f"strategies: {strategy}: {exc}") from None
            for recipe in self.recipes:  # a cell that cannot run is refused now, not an hour into the grid
                problem = recipe_problem(strategy_name(strategy), get_recipe(recipe))
                if problem:
                    raise ConfigError(f"strategies x recipes: {problem}")
        for objective in self.objectives:
            if objective not in OBJECTIVES:
                raise ConfigError(f"objectives: {objective!r} is not one of {', '.join(OBJECTIVES)}")
        checks = [
            (self.clients >= 1, "clients must be >= 1"),
            (self.rounds >= 1, "rounds must be >= 1"),
            (self.local_epochs > 0, "local_epochs must be > 0"),
            (self.client_optimizer in OPTIMIZERS, f"client_optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (0 < self.test_fraction < 1, "test_fraction must be in (0, 1)"),
            (0 <= self.validation_fraction < 1, "validation_fraction must be in [0, 1)"),
            (all(self.recipes) and self.splits and self.strategies and self.objectives and self.seeds, "empty axis"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"experiment: {message}")

    def params_of(self, strategy: str) -> dict:
        params = self.strategy_params.get(strategy, {})
        if not isinstance(params, dict):
            raise ConfigError(f"strategy_params.{strategy} must be a table, e.g. {{mu = 0.01}}")
        return params

    def cells(self) -> list[Cell]:
        """The grid, in order. The centralized reference runs with the first strategy only (one client: the
        strategies would differ in name alone, or in a server step no federation motivates)."""
        return [
            Cell(*values)
            for values in itertools.product(self.recipes, self.splits, self.strategies, self.objectives, self.seeds)
            if values[1] != "centralized" or values[2] == self.strategies[0]
        ]


@dataclasses.dataclass(frozen=True)
class Cell:
    recipe: str
    split: str
    strategy: str
    objective: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.recipe}__{self.split}__{self.strategy}__{self.objective}__s{self.seed}"

    @property
    def setting(self) -> tuple[str, str, str, str]:
        """The cell without its seed: seeds of one setting are averaged in the table."""
        return (self.recipe, self.split, self.strategy, self.objective)


def strategy_name(strategy: str) -> str:
    """The registered name of a grid strategy: 'fedavgm' for 'fedavgm@0.9' (a variant: other parameters)."""
    return strategy.split("@", 1)[0]


def split_kwargs(split: str) -> tuple[str, dict]:
    """('dirichlet', {'beta': 0.1}) for 'dirichlet-0.1': the partitioner and its arguments."""
    match = _SPLIT.match(split)
    if not match:
        raise ConfigError(f"split {split!r}: write centralized, iid, dirichlet-BETA, pathological-K or few-shot-K")
    if match["beta"]:
        return "dirichlet", {"beta": float(match["beta"])}
    if match["k"]:
        return "pathological", {"classes_per_client": int(match["k"])}
    if match["shots"]:
        return "few-shot", {"shots": int(match["shots"])}
    return match[1], {}  # iid or centralized


def load_experiment(path: str | Path | None, **overrides) -> ExperimentConfig:
    return load_config(ExperimentConfig, path, env_prefix=ENV_PREFIX, overrides=overrides)
