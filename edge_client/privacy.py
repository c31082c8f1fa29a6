"""Optional local differential privacy on the update: clip its change, then add Gaussian noise.

The change is what this device's data did to the adapter: local adapter minus the global adapter
it started from, over the tensors that are sent. It is scaled down to L2 norm `clip_norm` at most,
and noise N(0, (noise_multiplier * clip_norm)^2) is added to every coordinate (the Gaussian
mechanism on one client's contribution per round). The privacy budget this spends across rounds
depends on the run (rounds, participation); account for it with a DP accountant on the coordinator
side, from the `dp_noise_multiplier` every update reports.

The noise generator is seeded from the OS's entropy, never from the configured seed: noise that
another party could reproduce would protect nothing.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from flora.errors import ConfigError


@dataclass(frozen=True)
class LocalDP:
    clip_norm: float
    noise_multiplier: float = 0.0

    def __post_init__(self):
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ConfigError(f"dp_clip_norm must be a positive number, got {self.clip_norm}")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"dp_noise_multiplier must be >= 0, got {self.noise_multiplier}")

    @classmethod
    def from_settings(cls, clip_norm: float | None, noise_multiplier: float | None) -> LocalDP | None:
        if clip_norm is None:
            if noise_multiplier is not None:
                raise ConfigError(
                    "dp_noise_multiplier needs dp_clip_norm: the noise is scaled to the clipping norm; "
                    "set dp_clip_norm too (e.g. 1.0)"
                )
            return None
        return cls(float(clip_norm), float(noise_multiplier or 0.0))

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    def apply(self, local: dict[str, Any], reference: dict[str, Any], *, generator: Any = None) -> dict[str, Any]:
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

    def metrics(self) -> dict[str, float]:
        return {"dp_clip_norm": self.clip_norm, "dp_noise_multiplier": self.noise_multiplier}
