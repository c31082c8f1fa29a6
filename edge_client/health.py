"""The device's health, sent with every status: what an operator needs to see before a device fails a round.

Free memory, free disk under the state directory, the hottest thermal zone, the Jetson power mode, the GPU
load and the agent's version. On a Jetson they come from sysfs and nvpmodel's status file (no tegrastats
process to keep alive): thermal zones in /sys/class/thermal, the integrated GPU's load in
/sys/devices/gpu.0/load (per mille) or /sys/devices/platform/gpu.0/load, the power mode from
/var/lib/nvpmodel/status (written by nvpmodel). A reading that is not available is left out, never
reported as zero. Everything is read from `root` so tests can hand a fake sysfs tree.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any

from flora import __version__

log = logging.getLogger(__name__)

GPU_LOAD_FILES = ("sys/devices/gpu.0/load", "sys/devices/platform/gpu.0/load", "sys/devices/platform/17000000.gpu/load")
NVPMODEL_STATUS = "var/lib/nvpmodel/status"  # e.g. "pmode:0000 fmode:..." (mode id) on JetPack 5 and 6
NVPMODEL_CONF = "etc/nvpmodel.conf"  # "< POWER_MODEL ID=0 NAME=MAXN >" lines: the id's name


def read_health(state_dir: str | Path, *, root: str | Path = "/", cuda_device: str | None = None) -> dict[str, Any]:
    root = Path(root)
    health: dict[str, Any] = {"agent_version": __version__}
    memory = _memory_free_mb(root, cuda_device)
    if memory is not None:
        health["memory_free_mb"] = round(memory, 1)
    with contextlib.suppress(OSError):  # a state dir on a missing mount: no reading
        health["disk_free_mb"] = round(shutil.disk_usage(state_dir).free / 2**20, 1)
    for name, value in (
        ("temperature_c", _hottest_zone_c(root)),
        ("gpu_load_pct", _gpu_load_pct(root)),
        ("power_mode", _power_mode(root)),
    ):
        if value is not None:
            health[name] = value
    return health


def _memory_free_mb(root: Path, cuda_device: str | None) -> float | None:
    if cuda_device is not None and cuda_device.startswith("cuda"):
        try:
            import torch

            free, _total = torch.cuda.mem_get_info(torch.device(cuda_device))
            return free / 2**20
        except (ImportError, RuntimeError, ValueError):
            pass
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _hottest_zone_c(root: Path) -> float | None:
    """The highest of the thermal zones (millidegrees in sysfs); a Jetson has CPU, GPU, SoC and board zones."""
    readings = []
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*/temp")):
        try:
            millidegrees = int(zone.read_text().strip())
        except (OSError, ValueError):
            continue
        if -40_000 <= millidegrees <= 150_000:  # a disabled zone reports -256000 or similar
            readings.append(millidegrees / 1000)
    return round(max(readings), 1) if readings else None


def _gpu_load_pct(root: Path) -> float | None:
    for name in GPU_LOAD_FILES:
        try:
            per_mille = int((root / name).read_text().strip())
        except (OSError, ValueError):
            continue
        return round(min(max(per_mille, 0), 1000) / 10, 1)
    return None


def _power_mode(root: Path) -> str | None:
    """nvpmodel's mode name (MAXN, 15W, ...), from its status file and the mode table in /etc/nvpmodel.conf."""
    try:
        status = (root / NVPMODEL_STATUS).read_text()
    except OSError:
        return None
    mode_id = None
    for token in status.split():
        if token.startswith("pmode:"):
            try:
                mode_id = int(token.split(":", 1)[1])
            except ValueError:
                return None
    if mode_id is None:
        return None
    try:
        conf = (root / NVPMODEL_CONF).read_text()
    except OSError:
        return f"mode {mode_id}"
    for line in conf.splitlines():
        line = line.strip()
        if line.startswith("< POWER_MODEL") and f"ID={mode_id} " in line + " ":
            for field in line.strip("<> ").split():
                if field.startswith("NAME="):
                    return field.split("=", 1)[1][:32]
    return f"mode {mode_id}"
