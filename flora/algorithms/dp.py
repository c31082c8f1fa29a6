"""Bounding each client's influence, and differential privacy, on both sides.

Server: wrappers around any strategy: per-client norm clipping (`NormClipping`) and central DP
(`CentralDP`). Client: local DP (`LocalDP`), a client hook the device adds itself from its own
config (`dp_clip_norm`, `dp_noise_multiplier`). All act on the client's *change* (its adapter minus
the global one), the quantity whose size a malicious or buggy client controls and whose sensitivity
DP must bound.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from flora.algorithms.base import ClientHook, ClientUpdate, HookSpec, Strategy, class_path
from flora.algorithms.fedavg import FedAvg
from flora.algorithms.registry import register_client_hook
from flora.algorithms.tensor_math import Tensors, global_norm, subtract
from flora.errors import ConfigError


def clip_update(update: Tensors, reference: Tensors, max_norm: float) -> tuple[Tensors, float, bool]:
    """Scale `update - reference` down to L2 norm `max_norm` if larger. Returns (tensors, norm, clipped)."""
    delta = subtract(update, reference)
    norm = global_norm(delta)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (np.asarray(reference[k], np.float64) + delta[k] * scale).astype(np.float32) for k in delta}
    return clipped, norm, scale < 1.0


class _Wrapper(Strategy):
    def __init__(self, inner: Strategy):
        self.inner = inner
        self.name = f"{type(self).name}({inner.name})"

    # Everything but accumulate/round_metrics is the inner strategy's.
    def select(self, candidates, *, round_: int, rng_seed: int, default: list[str]) -> list[str]:
        return self.inner.select(candidates, round_=round_, rng_seed=rng_seed, default=default)

    def client_hooks(self) -> list[HookSpec]:
        return self.inner.client_hooks()

    def configure_train(self, round_: int, settings: dict[str, Any]) -> dict[str, Any]:
        return self.inner.configure_train(round_, settings)

    def expected_update(self, global_tensors: Tensors) -> Tensors:
        return self.inner.expected_update(global_tensors)

    def begin(self, round_: int, global_tensors: Tensors) -> None:
        self.reference = self.inner.expected_update(global_tensors)
        self.norms: list[float] = []
        self.clipped = 0
        self.inner.begin(round_, global_tensors)

    def _clip(self, update: ClientUpdate, max_norm: float) -> ClientUpdate:
        tensors, norm, clipped = clip_update(update.tensors, self.reference, max_norm)
        self.norms.append(norm)
        self.clipped += clipped
        return replace(update, tensors=tensors)

    def aggregate(self) -> Tensors:
        return self.inner.aggregate()

    def round_metrics(self) -> dict[str, float]:
        metrics = dict(self.inner.round_metrics())
        if self.norms:
            metrics.update(update_norm_median=float(np.median(self.norms)), updates_clipped=float(self.clipped))
        return metrics

    def state_dict(self) -> Tensors:
        return self.inner.state_dict()

    def load_state_dict(self, state: Tensors) -> None:
        self.inner.load_state_dict(state)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in super().params().items() if k != "inner"}

    def describe(self) -> dict[str, Any]:
        """The inner strategy's description, with this wrapper appended to its `wrappers`."""
        described = self.inner.describe()
        mine = {"name": type(self).name, "class": class_path(type(self)), "params": self.params()}
        return {**described, "wrappers": [*described["wrappers"], mine]}


class NormClipping(_Wrapper):
    """Bound every client's influence: its change is scaled to at most `max_norm` before aggregation."""

    name = "clip"

    def __init__(self, inner: Strategy, max_norm: float = 1.0):
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        super().__init__(inner)
        self.max_norm = max_norm

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(self._clip(update, self.max_norm))


class CentralDP(_Wrapper):
    """DP-FedAvg (McMahan et al. 2018) with a fixed number of clients per round.

    Each change is clipped to `clip_norm` and weighted equally, so one client moves the mean by at
    most clip_norm / n; Gaussian noise with std noise_multiplier * clip_norm / n is added to the
    mean, before any server optimizer step. The privacy accounting (epsilon over rounds) is left
    to the operator; the noise multiplier is reported every round.
    """

    name = "dp"

    def __init__(self, inner: Strategy, clip_norm: float = 1.0, noise_multiplier: float = 1.0, seed: int = 0):
        if not isinstance(inner, FedAvg):
            raise ValueError("central DP needs a mean-based strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi)")
        if clip_norm <= 0 or noise_multiplier < 0:
            raise ValueError("clip_norm must be > 0 and noise_multiplier >= 0")
        super().__init__(inner)
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.noise_std = 0.0
        inner.add_mean_transform(self._add_noise)

    def accumulate(self, update: ClientUpdate) -> None:
        self.inner.accumulate(replace(self._clip(update, self.clip_norm), num_examples=1))

    def _add_noise(self, mean: Tensors, count: int) -> Tensors:
        self.noise_std = self.noise_multiplier * self.clip_norm / count
        return {k: v + self.rng.normal(0.0, self.noise_std, size=v.shape) for k, v in mean.items()}

    def round_metrics(self) -> dict[str, float]:
        return {**super().round_metrics(), "dp_noise_multiplier": self.noise_multiplier, "dp_noise_std": self.noise_std}


@register_client_hook("local_dp")
@dataclass(frozen=True)
class LocalDP(ClientHook):
    """Local DP on the update: clip its change, then add Gaussian noise, before it leaves the device.

    The change is what this device's data did to the adapter: local adapter minus the global adapter
    it started from, over the tensors that are sent. It is scaled down to L2 norm `clip_norm` at most,
    and noise N(0, (noise_multiplier * clip_norm)^2) is added to every coordinate (the Gaussian
    mechanism on one client's contribution per round). The privacy budget this spends across rounds
    depends on the run (rounds, participation); account for it with a DP accountant on the coordinator
    side, from the `dp_noise_multiplier` every update reports.

    The noise generator is seeded from the OS's entropy, never from the configured seed: noise that
    another party could reproduce would protect nothing. A device adds this hook last, after the
    instruction's hooks, so nothing changes the update after the noise.
    """

    clip_norm: float
    noise_multiplier: float = 0.0

    def __post_init__(self):
        for value, what in ((self.clip_norm, "dp_clip_norm"), (self.noise_multiplier, "dp_noise_multiplier")):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{what} must be a number, got {value!r}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"dp_clip_norm must be a positive number, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"dp_noise_multiplier must be >= 0, got {self.noise_multiplier}")

    @classmethod
    def from_settings(cls, clip_norm: float | None, noise_multiplier: float | None) -> LocalDP | None:
        """The hook a device's config asks for, or None when local DP is off."""
        if clip_norm is None:
            if noise_multiplier is not None:
                raise ConfigError(
                    "dp_noise_multiplier needs dp_clip_norm: the noise is scaled to the clipping norm; "
                    "set dp_clip_norm too (e.g. 1.0)"
                )
            return None
        return cls(float(clip_norm), float(noise_multiplier or 0.0))

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> LocalDP:
        try:
            return super().from_params(params)
        except ConfigError as exc:  # from the network, a bad value is a ValueError like any hook's
            raise ValueError(f"client hook 'local_dp': {exc}") from None

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def apply(self, local: dict[str, Any], reference: Mapping[str, Any], *, generator: Any = None) -> dict[str, Any]:
        """`reference + noise + clip(local - reference)`, for the tensors in `local` (fp32 CPU tensors)."""
        import torch

        missing = sorted(set(local) - set(reference))
        if missing:
            raise ValueError(f"no reference (global) tensor for {missing[:3]}")
        deltas = {k: local[k].float() - torch.as_tensor(reference[k]).float() for k in local}
        norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in deltas.values()))
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        if generator is None and self.noise_std > 0:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        out = {}
        for name, delta in deltas.items():
            change = delta * scale
            if self.noise_std > 0:
                change = change + torch.randn(delta.shape, generator=generator) * self.noise_std
            out[name] = torch.as_tensor(reference[name]).float() + change
        return out

    def process_update(self, update: dict[str, Any], global_adapter: Mapping[str, Any]) -> dict[str, Any]:
        return self.apply(update, global_adapter)

    def metrics(self) -> dict[str, float]:
        return {"dp_clip_norm": self.clip_norm, "dp_noise_multiplier": self.noise_multiplier}
