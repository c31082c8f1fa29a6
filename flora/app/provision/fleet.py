"""The fleet's settings, kept in the provisioning directory (OUT/fleet.toml) so later devices join the same fleet.

The first `flora provision` writes them from its flags (or their defaults). A later run that adds
devices reads them: a flag left out takes the fleet's value, and a flag that contradicts it is
refused, unless `--update-fleet` says the change is meant (it then applies to devices provisioned
from now on; the ones already provisioned keep their configs).

Paths are the documented install locations on each machine (docs/EDGE.md, deploy/systemd/):
absolute, so a service finds them whatever its working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib

from flora.config import toml_value
from flora.errors import ConfigError
from flora.files import atomic_write_bytes

FLEET_FILE = "fleet.toml"

# Every fleet setting with its default. install_dir "" means: configs name the files where they were written.
FLEET_DEFAULTS: dict[str, str] = {
    "broker_url": "mqtts://broker.local:8883",
    "run_id": "default",
    "coordinator_id": "coordinator",
    "model": "openai/clip-vit-base-patch32",
    "data_dir": "/var/lib/flora/data",
    "state_dir": "/var/lib/flora",
    "checkpoint_dir": "/var/lib/flora/coordinator",
    "install_dir": "/etc/flora",
    "certs": "",
}


def load_fleet(out: Path) -> dict[str, str] | None:
    """The settings saved by an earlier provisioning into `out`, or None for a new fleet directory."""
    path = Path(out) / FLEET_FILE
    if not path.is_file():
        return None
    try:
        saved = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML ({exc}); fix it or restore it from a backup") from None
    unknown = sorted(set(saved) - set(FLEET_DEFAULTS))
    if unknown or not all(isinstance(v, str) for v in saved.values()):
        raise ConfigError(f"{path} holds unknown or non-text settings {unknown}; it is written by flora provision")
    return {**FLEET_DEFAULTS, **saved}


def resolve_fleet(out: Path, flags: dict[str, Any], *, update: bool = False) -> dict[str, str]:
    """The settings to provision with: the fleet's saved ones, overridden by flags only where `update` allows.

    `flags` maps setting -> the flag's value, None where the flag was not given.
    """
    given = {k: str(v) for k, v in flags.items() if v is not None}
    unknown = sorted(set(given) - set(FLEET_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown fleet settings {unknown}")
    saved = load_fleet(out)
    if saved is None:
        return {**FLEET_DEFAULTS, **given}
    conflicts = {k: (saved[k], v) for k, v in given.items() if saved[k] != v}
    if conflicts and not update:
        listed = "; ".join(f"{k}: fleet has {old!r}, flag says {new!r}" for k, (old, new) in sorted(conflicts.items()))
        raise ConfigError(
            f"{Path(out) / FLEET_FILE} was provisioned with other settings ({listed}). Leave those flags out to "
            "add devices to the same fleet, or pass --update-fleet to change them for devices provisioned from now on"
        )
    return {**saved, **given}


def save_fleet(out: Path, settings: dict[str, str]) -> Path:
    path = Path(out) / FLEET_FILE
    lines = ["# The fleet's settings, written by `flora provision`; later runs add devices with them."]
    lines += [f"{key} = {toml_value(settings[key])}" for key in FLEET_DEFAULTS]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
