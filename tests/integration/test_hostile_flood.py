"""Floods from the network against a real coordinator, Mosquitto and honest agents (issue 10, items 2, 3, 6).

Each attack runs while the coordinator waits for its clients; then honest clients join and the round must
complete. Memory is the test process's RSS (the coordinator runs here, in a thread), measured as a delta across
the flood, after the coordinator has read every byte of it (polled on its transport's byte counter), and
before any agent loads a model. The bound, FLOOD_RSS_BOUND, is the issue's target: 32 MiB over the
un-attacked coordinator. (Linux and glibc: /proc and malloc_trim.)
"""

from __future__ import annotations

import ctypes
import gc
import logging
import subprocess
import sys
import threading
import time
import warnings

import pytest

from coordinator.main import build_coordinator
from flora.protocol import Topics
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
FLOOD_RSS_BOUND = 32 * MiB
CLIENTS = 2


def fix_mmap_threshold() -> None:
    """Make glibc serve every large buffer (a flood's 8 MiB messages) from mmap, and so return it on free.

    By default glibc raises its mmap threshold after a large mmapped block is freed, up to 32 MiB, so the next
    8 MiB buffers come from the heap, where fragmentation left by earlier tests in the same process can keep them
    resident after they are freed: RSS then measures the allocator's history, not what the coordinator holds.
    Setting the threshold once (M_MMAP_THRESHOLD, mallopt parameter -3) turns that adjustment off."""
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)


def rss() -> int:
    """Resident memory of what is still held: freed memory is first handed back to the OS (glibc keeps freed
    blocks in per-thread arenas otherwise, and the flood passes through three threads here)."""
    with warnings.catch_warnings():
        # A full collection here finalizes a broker socket that building the federation dropped unclosed (not one
        # of the coordinator's: see the report of issue 10); that is not what these tests are about.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Federation:
    """A coordinator running in a thread, waiting for CLIENTS honest clients that join when `join()` is called."""

    def __init__(self, tmp_path, broker_url, model_dir, digits, digits_split, test_folder, **coordinator_settings):
        train_idx, _ = digits_split
        self.data_dirs = stage_clients(tmp_path, digits, train_idx, clients=CLIENTS, per_client=40)
        self.tmp_path, self.broker_url, self.model_dir = tmp_path, broker_url, model_dir
        settings = dict(rounds=1, local_epochs=1, round_deadline_s=60.0, max_round_attempts=1)
        settings.update(coordinator_settings)
        self.config = coordinator_config(tmp_path, model_dir, broker_url, test_folder, clients=CLIENTS, **settings)
        self.topics = Topics(self.config.run_id)
        self.coordinator = build_coordinator(self.config)
        self.coordinator.start()
        self.report: dict | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.threads: list[threading.Thread] = []

    def _run(self) -> None:
        try:
            self.report = self.coordinator.run()
        except BaseException as exc:  # reported by finish(): the test thread must see it
            self.error = exc

    @property
    def bytes_received(self) -> int:
        return self.coordinator.transport.bytes_received

    def has_read(self, received_before: int, sent: int) -> bool:
        """Whether the coordinator received `sent` more bytes and took every one of them from its inbox."""
        inner = self.coordinator.transport.inner
        return self.bytes_received - received_before >= sent and inner.inbox_bytes == 0

    def join(self, **client_settings) -> None:
        configs = client_configs(self.tmp_path, self.model_dir, self.broker_url, self.data_dirs, self.config.run_id)
        for config in configs:
            for name, value in client_settings.items():
                setattr(config, name, value)
        _agents, self.threads = start_agents(configs)

    def finish(self) -> dict:
        self.thread.join(180)
        for thread in self.threads:
            thread.join(60)
        rss()  # collects, here, the broker socket building the federation leaves unclosed (not a later test)
        assert self.error is None, f"the coordinator stopped: {self.error!r}"
        assert self.report is not None
        return self.report


def attack(fed: Federation, name: str) -> int:
    """Run one attack from tests/integration/hostile_senders.py in its own process; bytes it published."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.integration.hostile_senders", name, fed.broker_url, fed.config.run_id],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(done.stdout.split()[-1])


def flood(fed: Federation, name: str, rejections: int = 0) -> int:
    """RSS growth of the coordinator across attack `name`, once it has read every byte of it (and, with
    `rejections`, refused that many messages: taken from the inbox is not yet done with, and on a busy machine the
    last message can still be in the coordinator's hands when the inbox is empty)."""
    fix_mmap_threshold()
    before, received = rss(), fed.bytes_received
    refused_before = sum(fed.coordinator.rejections.values())
    sent = attack(fed, name)
    wait_for(lambda: fed.has_read(received, sent), 120, f"the coordinator to read the {name} flood")
    refused = lambda: sum(fed.coordinator.rejections.values()) - refused_before  # noqa: E731
    wait_for(lambda: refused() >= rejections, 60, f"the coordinator to refuse {rejections} messages")
    assert fed.thread.is_alive(), f"the coordinator stopped: {fed.error!r}"
    return rss() - before


def test_a_flood_of_large_unsigned_early_updates_on_a_devices_own_topic_is_not_held(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder, caplog
):
    caplog.set_level(logging.WARNING, logger="coordinator")
    fed = Federation(tmp_path, mosquitto.url, tiny_model_dir, digits, digits_split, test_folder)
    grown = flood(fed, "early_updates", rejections=24)  # 24 unsigned 8 MiB updates for round 1 on mallory's topic
    assert grown <= FLOOD_RSS_BOUND, f"RSS grew {grown / MiB:.0f} MiB holding a flood of early updates"
    assert any("larger than an update of this run's adapter" in r.getMessage() for r in caplog.records)
    fed.join()
    report = fed.finish()
    assert [r["participants"] for r in report["rounds"]] == [CLIENTS]


def test_one_device_holding_300_partial_transfers_does_not_starve_honest_chunked_updates(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    fed = Federation(tmp_path, mosquitto.url, tiny_model_dir, digits, digits_split, test_folder)
    flood(fed, "partial_transfers")  # 320 transfers opened on mallory's own topic, kept (idle timeout 120 s)
    fed.join(max_message_bytes=4096)  # honest updates travel as chunks too
    report = fed.finish()
    (record,) = report["rounds"]
    assert record["participants"] == CLIENTS, record
    assert sorted(record["accepted"]) == [f"client-{i}" for i in range(CLIENTS)]


def test_2000_fake_statuses_of_120_kb_on_an_open_broker_keep_the_coordinators_memory_bounded(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    fed = Federation(tmp_path, mosquitto.url, tiny_model_dir, digits, digits_split, test_folder)
    grown = flood(fed, "fake_statuses")
    assert grown <= FLOOD_RSS_BOUND, f"RSS grew {grown / MiB:.0f} MiB holding 2,000 fake statuses"
    fed.join()
    report = fed.finish()
    assert [r["participants"] for r in report["rounds"]] == [CLIENTS]
