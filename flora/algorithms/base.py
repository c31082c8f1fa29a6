"""The two halves of a federated algorithm: the server's `Strategy` and the client's `ClientHook`.

A Strategy sees a round as: `select` the clients among the eligible candidates, `configure_train`
the settings they receive (including the client hooks they must run), `begin` with the global
adapter, `accumulate` each accepted update as it arrives, then `aggregate` to get the next global
adapter. Linear strategies accumulate running sums, so memory does not grow with the number of
clients; order statistics (median, trimmed mean) need every update, so they spill them to disk as they
arrive (flora/algorithms/spill.py) and reduce a block of coordinates at a time. `state_dict`
holds what must survive a restart (server-optimizer moments) as named arrays, saved beside the
adapter in a checkpoint.

A ClientHook is what an algorithm changes in local training, at three points of the trainer's
round: which parameters train (`trains`), an extra term of the loss (`loss_term`), and the update
before it leaves the device (`process_update`). Server halves are NumPy-only; client halves import
torch inside their methods, so the coordinator imports nothing heavy.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flora.algorithms.tensor_math import Tensors

HookSpec = dict[str, Any]  # {"name": str, "params": {...}}: one client hook, as the instruction carries it


@dataclass
class ClientUpdate:
    node: str
    round: int
    tensors: Tensors
    num_examples: int
    metrics: dict[str, Any] = field(default_factory=dict)
    bytes: int = 0
    claimed_examples: int | None = None  # what the client claimed when its weight was capped (coordinator/weighting.py)


@dataclass(frozen=True)
class Candidate:
    """A client eligible for this round (online, on the run's recipe, meeting the requirements)."""

    node: str
    capabilities: Mapping[str, Any] = field(default_factory=dict)  # as announced in its status (§5.1)


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return repr(value)


def constructor_params(obj: Any) -> dict[str, Any]:
    """The values of `obj`'s constructor arguments, read back from attributes of the same name.

    What `describe` records by default; a class whose attributes are named otherwise overrides `params`.
    """
    names = [
        p.name
        for p in inspect.signature(type(obj).__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return {name: _json_safe(getattr(obj, name)) for name in names if hasattr(obj, name)}


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Strategy(abc.ABC):
    name: str = ""
    accepts_lower_rank: bool = False  # clients may send LoRA factors of a rank below the global one
    needs_lora_factors: bool = False  # acts on LoRA's A and B: a recipe without LoRA layers is refused with it

    # -- before the round --------------------------------------------------------------------
    def select(self, candidates: list[Candidate], *, round_: int, rng_seed: int, default: list[str]) -> list[str]:
        """The node ids to train this round, chosen among `candidates`.

        `default` is the registry's seeded sample (clients_per_round_fraction, min_clients_per_round);
        `rng_seed` seeds any randomness of your own, so a resumed or repeated run selects the same.
        Returning a node that is not a candidate is an error.
        """
        return list(default)

    def client_hooks(self) -> list[HookSpec]:
        """The client hooks every selected client must run, e.g. [{"name": "fedprox", "params": {"mu": 0.01}}]."""
        return []

    def configure_train(self, round_: int, settings: dict[str, Any]) -> dict[str, Any]:
        """Training settings sent to clients with the instruction; adds `client_hooks` when there are any."""
        hooks = self.client_hooks()
        return {**settings, "client_hooks": hooks} if hooks else settings

    def expected_update(self, global_tensors: Tensors) -> Tensors:
        """The tensors a client must send back (FFA-LoRA: only the B matrices)."""
        return global_tensors

    # -- the round ---------------------------------------------------------------------------
    @abc.abstractmethod
    def begin(self, round_: int, global_tensors: Tensors) -> None: ...

    @abc.abstractmethod
    def accumulate(self, update: ClientUpdate) -> None: ...

    @abc.abstractmethod
    def aggregate(self) -> Tensors: ...

    def round_metrics(self) -> dict[str, float]:
        """Scalars about the last aggregation, recorded in the round's metrics."""
        return {}

    # -- persistence and reporting -----------------------------------------------------------
    def state_dict(self) -> Tensors:
        return {}

    def load_state_dict(self, state: Tensors) -> None:
        return None

    def params(self) -> dict[str, Any]:
        """The parameters this strategy was built with (by default: its constructor's, read back)."""
        return constructor_params(self)

    def describe(self) -> dict[str, Any]:
        """What ran, for the report: name, parameters, wrappers, client hooks, and the class."""
        return {
            "name": self.name,
            "class": class_path(type(self)),
            "params": self.params(),
            "wrappers": [],
            "client_hooks": _json_safe(self.client_hooks()),
        }


class ClientHook(abc.ABC):  # noqa: B024 -- an interface whose every hook point is optional
    """One algorithm's change to local training. Every method has a do-nothing default.

    Hooks run in order: the instruction's (the coordinator's strategy), then the device's own
    (local DP, which must be the last to touch the update). Parameters from the network reach the
    constructor through `from_params`, which must validate them by type and range (raise ValueError
    with a message that says what is accepted).
    """

    name: str = ""
    adds_loss_term: bool = False  # the trainer keeps each parameter's start value only when a hook needs it

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ClientHook:
        try:
            inspect.signature(cls).bind(**params)
        except TypeError:
            valid = [p for p in inspect.signature(cls).parameters]
            raise ValueError(
                f"client hook {cls.name!r} takes parameters {valid or 'none'}, got {sorted(params)}"
            ) from None
        return cls(**params)

    def trains(self, parameter_name: str) -> bool:
        """Whether this adapter parameter trains this round (all hooks must agree)."""
        return True

    def loss_term(self, params: Mapping[str, Any], start: Mapping[str, Any]) -> Any:
        """An extra term of the local loss (a torch scalar) from the trainable parameters and their
        values at the start of the round, or None. Only called when `adds_loss_term` is set."""
        return None

    def process_update(self, update: dict[str, Any], global_adapter: Mapping[str, Any]) -> dict[str, Any]:
        """The update to send (name -> fp32 CPU tensor), given the global adapter the round started from."""
        return update

    def metrics(self) -> dict[str, float]:
        """Scalars added to the update's metrics."""
        return {}

    def params(self) -> dict[str, Any]:
        return constructor_params(self)

    def describe(self) -> HookSpec:
        return {"name": self.name, "params": self.params()}
