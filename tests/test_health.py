"""The device's health in its status: read from (a fake) Jetson sysfs, checked on receipt, refreshed while running."""

from __future__ import annotations

import threading
import time

from edge_client.health import read_health
from flora import __version__
from flora.protocol import envelope_from_bytes
from flora.protocol.schema import check_data


def fake_jetson(root):
    (root / "proc").mkdir(parents=True)
    (root / "proc/meminfo").write_text("MemTotal: 7800000 kB\nMemAvailable:    5222400 kB\n")
    for i, millidegrees in enumerate(["41500", "-256000", "48250", "garbage"]):  # a disabled and a broken zone
        zone = root / f"sys/class/thermal/thermal_zone{i}"
        zone.mkdir(parents=True)
        (zone / "temp").write_text(millidegrees + "\n")
    (root / "sys/devices/gpu.0").mkdir(parents=True)
    (root / "sys/devices/gpu.0/load").write_text("734\n")
    (root / "var/lib/nvpmodel").mkdir(parents=True)
    (root / "var/lib/nvpmodel/status").write_text("pmode:0001 fmode:quiet\n")
    (root / "etc").mkdir()
    (root / "etc/nvpmodel.conf").write_text(
        "< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=15W >\nCPU_ONLINE CORE_0 1\n"
    )
    return root


def test_health_is_read_from_a_jetsons_sysfs(tmp_path):
    health = read_health(tmp_path, root=fake_jetson(tmp_path / "root"))
    assert health.pop("disk_free_mb") > 0
    assert health == {
        "agent_version": __version__,
        "memory_free_mb": 5100.0,
        "temperature_c": 48.2,  # the hottest valid zone; the disabled and the broken ones are ignored
        "gpu_load_pct": 73.4,
        "power_mode": "15W",
    }


def test_what_a_device_cannot_read_is_left_out_not_zero(tmp_path):
    (tmp_path / "empty").mkdir()
    health = read_health(tmp_path / "no-such-dir", root=tmp_path / "empty")
    assert health == {"agent_version": __version__}


def test_health_from_the_network_is_checked_entry_by_entry():
    status = {
        "state": "online",
        "health": {"temperature_c": float("nan"), "gpu_load_pct": 250, "power_mode": "M" * 40, "disk_free_mb": 10.0},
    }
    assert check_data("status", status)["health"] == {"disk_free_mb": 10.0}


def test_a_running_agent_refreshes_its_status_with_health(tmp_path, tiny_model_dir, digits):
    from edge_client.config import ClientConfig
    from edge_client.main import build_agent
    from flora.data.datasets import write_image_folder
    from flora.transport import MemoryBroker, MemoryTransport

    broker_name = "health-refresh"
    observer = MemoryTransport(MemoryBroker.named(broker_name), "observer")
    observer.connect()
    observer.subscribe("flora/v1/health/status/+")
    config = ClientConfig(
        node_id="jetson-7",
        run_id="health",
        model=str(tiny_model_dir),
        data_dir=write_image_folder(digits.subset(range(20)), tmp_path / "data"),
        broker_url=f"memory://{broker_name}",
        state_dir=tmp_path / "state",
        status_interval_s=1.0,
    )
    agent = build_agent(config, progress=False)
    thread = threading.Thread(target=agent.run, kwargs={"max_seconds": 30}, daemon=True)
    thread.start()
    statuses, deadline = [], time.monotonic() + 30
    while len(statuses) < 3 and time.monotonic() < deadline:  # the online status at connect, then refreshes
        message = observer.receive(timeout=0.5)
        if message is not None and message.payload:
            statuses.append(envelope_from_bytes(message.payload).data)
    agent.finished = agent.config.exit_when_finished = True  # stop the loop
    thread.join(30)
    observer.close()
    MemoryBroker._named.pop(broker_name, None)
    assert len(statuses) >= 3 and all(s["state"] == "online" for s in statuses[:3])
    assert all(s["health"]["agent_version"] == __version__ and s["health"]["disk_free_mb"] > 0 for s in statuses[:3])
