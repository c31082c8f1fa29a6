"""Algorithms by name: the strategies a coordinator config can name, the hooks an instruction can name.

Three ways in, one lookup:
- built-ins register themselves with the decorators below when `flora.algorithms` is imported;
- your own code: `@register_strategy("mine")` on a Strategy subclass (or `register_strategy("mine", Mine)`),
  `@register_client_hook("mine")` on a ClientHook subclass, imported before the config is read;
- installed plugins: an entry point in group `flora.strategies` (or `flora.client_hooks`) whose name is
  the algorithm's name and whose object is the class. Entry points are loaded lazily, only when a
  name is not registered, so an unrelated broken plugin cannot stop a run.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, TypeVar

from flora.algorithms.base import ClientHook, HookSpec, Strategy

STRATEGY_ENTRY_POINTS = "flora.strategies"
CLIENT_HOOK_ENTRY_POINTS = "flora.client_hooks"
WRAPPER_PARAMS = ("clip_norm", "noise_multiplier", "dp_seed")  # wrap any strategy (see make_strategy)
MAX_CLIENT_HOOKS = 16  # an instruction naming more is refused: no legitimate strategy needs that many

T = TypeVar("T", bound=type)


class _Registry:
    """name -> class, with entry-point fallback; one per kind of algorithm."""

    def __init__(self, kind: str, base: type, group: str):
        self.kind, self.base, self.group = kind, base, group
        self.classes: dict[str, type] = {}

    def register(self, name: str, cls: type, *, replace: bool = False) -> type:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register_{self.kind.replace(' ', '_')}({name!r}): {cls!r} is not a {self.base.__name__}")
        known = self.classes.get(name)
        if known is not None and known is not cls and not replace:
            raise ValueError(
                f"{self.kind} {name!r} is already registered to {known.__module__}.{known.__qualname__}; "
                "pick another name, or pass replace=True"
            )
        if "name" not in vars(cls):  # a subclass would otherwise report its parent's name
            cls.name = name
        self.classes[name] = cls
        return cls

    def _entry_points(self) -> dict[str, metadata.EntryPoint]:
        return {ep.name: ep for ep in metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted({*self.classes, *self._entry_points()})

    def get(self, name: str) -> type:
        if name in self.classes:
            return self.classes[name]
        entry = self._entry_points().get(name) if isinstance(name, str) else None
        if entry is None:
            raise ValueError(self.unknown_message(name))
        try:
            loaded = entry.load()
        except Exception as exc:  # a plugin's import error: name it, do not crash the caller's message
            raise ValueError(f"{self.kind} {name!r}: loading entry point {entry.value!r} failed: {exc}") from exc
        return self.register(name, loaded)

    def unknown_message(self, name: object) -> str:
        names = self.names()
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (
            f"unknown {self.kind} {name!r}{hint}; choose one of: {', '.join(names)} "
            f"(or register your own with register_{self.kind.replace(' ', '_')}, or install a plugin "
            f"with a {self.group!r} entry point)"
        )


_strategies = _Registry("strategy", Strategy, STRATEGY_ENTRY_POINTS)
_client_hooks = _Registry("client hook", ClientHook, CLIENT_HOOK_ENTRY_POINTS)


def _decorator_or_call(registry: _Registry, name: str, cls: T | None, replace: bool) -> Any:
    if cls is not None:
        return registry.register(name, cls, replace=replace)

    def decorate(target: T) -> T:
        return registry.register(name, target, replace=replace)

    return decorate


def register_strategy(name: str, cls: type[Strategy] | None = None, *, replace: bool = False) -> Any:
    """Make a Strategy subclass available by name (`strategy = "name"` in coordinator.toml).

    As a decorator, `@register_strategy("mine")`, or a call, `register_strategy("mine", Mine)`.
    Its constructor's keyword arguments are the `strategy_params`.
    """
    return _decorator_or_call(_strategies, name, cls, replace)


def register_client_hook(name: str, cls: type[ClientHook] | None = None, *, replace: bool = False) -> Any:
    """Make a ClientHook subclass available by name, for instructions' `client_hooks` (docs/PROTOCOL.md §5.2).

    The device must have it registered too (same code imported, or the plugin installed).
    """
    return _decorator_or_call(_client_hooks, name, cls, replace)


def strategy_names() -> list[str]:
    """Every strategy name a config may use: registered ones and installed plugins'."""
    return _strategies.names()


def client_hook_names() -> list[str]:
    return _client_hooks.names()


def strategy_class(name: str) -> type[Strategy]:
    """The class registered under `name`; ValueError with the choices (and a "did you mean") if none."""
    return _strategies.get(name)


def client_hook_class(name: str) -> type[ClientHook]:
    return _client_hooks.get(name)


def _construct(factory: Callable[..., Any], label: str, params: Mapping[str, Any], extra: str = "") -> Any:
    """factory(**params), or ValueError naming the parameters it takes."""
    try:
        inspect.signature(factory).bind(**params)
    except TypeError:
        valid = list(inspect.signature(factory).parameters)
        raise ValueError(f"{label} takes parameters {valid or 'none'}{extra}; got {sorted(params)}") from None
    return factory(**params)


def recipe_problem(name: str, recipe: Any) -> str | None:
    """Why strategy `name` cannot run recipe `recipe` (a flora.modeling.recipes.LoraRecipe), or None."""
    if strategy_class(name).needs_lora_factors and not recipe.has_lora:
        return (
            f"strategy {name!r} acts on LoRA factors, and recipe {recipe.name!r} has none (it trains whole "
            "modules); use a strategy that averages any tensor (fedavg, fedavgm, fedprox, ...) or a LoRA recipe"
        )
    return None


def make_strategy(name: str, params: Mapping[str, Any] | None = None) -> Strategy:
    """Build `name` with `params`; `clip_norm` adds norm clipping, plus `noise_multiplier` central DP.

    Raises ValueError naming the valid parameters when one is unknown or out of range.
    """
    # dp.py registers itself through this module: import it here, not at the top, to avoid a cycle.
    from flora.algorithms.dp import CentralDP, NormClipping

    params = dict(params or {})
    wrapper = {k: params.pop(k) for k in list(params) if k in WRAPPER_PARAMS}
    cls = strategy_class(name)
    strategy = _construct(cls, f"strategy {name!r}", params, f" (plus {', '.join(WRAPPER_PARAMS)})")
    if "noise_multiplier" in wrapper:
        return CentralDP(
            strategy,
            clip_norm=float(wrapper.get("clip_norm", 1.0)),
            noise_multiplier=float(wrapper["noise_multiplier"]),
            seed=int(wrapper.get("dp_seed", 0)),
        )
    if "clip_norm" in wrapper:
        return NormClipping(strategy, max_norm=float(wrapper["clip_norm"]))
    return strategy


def make_client_hook(name: str, params: Mapping[str, Any] | None = None) -> ClientHook:
    """Build the hook `name` from (possibly untrusted) `params`; ValueError says what is wrong."""
    cls = client_hook_class(name)
    return cls.from_params(dict(params or {}))


def client_hooks_from_instruction(specs: Any) -> tuple[ClientHook, ...]:
    """The hooks a `train` instruction's `client_hooks` names, validated field by field.

    `specs` comes from the network: a list of at most MAX_CLIENT_HOOKS objects {"name": str,
    "params": object (optional)}, each name registered on this device and named once.
    Anything else raises ValueError with the reason (the agent logs it and does not train).
    """
    if not isinstance(specs, list):
        raise ValueError(f"client_hooks must be a list of {{name, params}} objects, got {type(specs).__name__}")
    if len(specs) > MAX_CLIENT_HOOKS:
        raise ValueError(f"client_hooks names {len(specs)} hooks; at most {MAX_CLIENT_HOOKS} are accepted")
    hooks: list[ClientHook] = []
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"each client_hooks entry must be an object with a string 'name', got {spec!r:.80}")
        name, params = spec["name"], spec.get("params", {})
        if set(spec) - {"name", "params"}:
            raise ValueError(f"client hook {name!r}: unknown keys {sorted(set(spec) - {'name', 'params'})}")
        if not isinstance(params, dict):
            raise ValueError(f"client hook {name!r}: params must be an object, got {type(params).__name__}")
        if name in seen:
            raise ValueError(f"client hook {name!r} is named twice")
        seen.add(name)
        try:
            hooks.append(make_client_hook(name, params))
        except ValueError:
            raise
        except Exception as exc:  # a user hook's constructor met values it did not expect: still a refusal
            raise ValueError(f"client hook {name!r} refused params {params!r:.80}: {exc}") from exc
    return tuple(hooks)


def hook_specs(hooks: tuple[ClientHook, ...] | list[ClientHook]) -> list[HookSpec]:
    """The wire form of `hooks` (what client_hooks_from_instruction reads back)."""
    return [hook.describe() for hook in hooks]
