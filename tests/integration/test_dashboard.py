"""`flora dashboard` against a real run: a 2-round federation on Mosquitto, the dashboard observing the same
broker, and the page rendered by a real headless Chromium. Also: hostile messages on a real broker."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from coordinator.main import build_coordinator
from flora.app.dashboard.observer import BrokerObserver
from flora.app.dashboard.state import DashboardState, Limits
from flora.protocol import Envelope, Topics, envelope_to_bytes
from flora.transport import Message, connect_transport
from tests.dashboards import dashboard_server, get
from tests.integration.helpers import client_configs, coordinator_config, stage_clients, start_agents

pytestmark = pytest.mark.integration


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("Chromium is not installed: run .ci/run or `apt-get install chromium`")


def headless(url: str, *args: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget: Chromium runs the page's timers and fetches, then dumps or shoots what they drew.
    argv = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def rows(dom: str, attribute: str) -> dict[str, str]:
    """{attribute value: the row's text} for each <tr attribute="..."> of the rendered DOM."""
    found = re.findall(rf'<tr {attribute}="([^"]+)">(.*?)</tr>', dom, flags=re.S)
    return {key: html.unescape(re.sub(r"<[^>]+>", " ", row)) for key, row in found}


def poll(what: str, check, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_page_shows_the_nodes_and_rounds_of_a_real_run(
    tmp_path, mosquitto, tiny_model_dir, digits, digits_split, test_folder
):
    train_idx, _ = digits_split
    data_dirs = stage_clients(tmp_path, digits, train_idx, clients=2, per_client=200)
    config = coordinator_config(tmp_path, tiny_model_dir, mosquitto.url, test_folder, clients=2, rounds=2)
    state = DashboardState()
    observer = BrokerObserver(mosquitto.url, state)
    observer.start()
    try:
        coordinator = build_coordinator(config)
        _agents, threads = start_agents(client_configs(tmp_path, tiny_model_dir, mosquitto.url, data_dirs))
        report = coordinator.run()
        for t in threads:
            t.join(30)
        accuracies = [r["accuracy"] for r in report["rounds"]]
        assert len(accuracies) == 2 and all(isinstance(a, float) for a in accuracies)

        with dashboard_server(state, mosquitto.url) as base:

            def served_rounds():
                snapshot = json.loads(get(base + "api/state")[2])
                run = next((r for r in snapshot["runs"] if r["run"] == config.run_id), None)
                return run if run and len(run["rounds"]) == 2 and run["finished"] else None

            poll("the dashboard to hold both rounds", served_rounds)

            dump = headless(base, "--dump-dom")
            assert dump.returncode == 0, dump.stderr[-2000:]
            dom = dump.stdout
            nodes = rows(dom, "data-node")
            assert set(nodes) == {"client-0", "client-1"}, dom[-3000:]
            rounds = rows(dom, "data-round")
            assert set(rounds) == {"1", "2"}
            for number, accuracy in enumerate(accuracies, start=1):
                assert f"{accuracy * 100:.2f}%" in rounds[str(number)], (number, rounds[str(number)])
            # The last round's progress: both selected clients answered and were accepted.
            assert re.findall(r'data-selected="([^"]+)">[^<]*: accepted<', dom) == ["client-0", "client-1"]
            assert dom.count("<polyline") == 2  # accuracy and loss charts drew their lines
            assert "finished" in dom

            shot = tmp_path / "dashboard.png"
            taken = headless(base, f"--screenshot={shot}", "--window-size=1280,1200", "--hide-scrollbars")
            assert taken.returncode == 0, taken.stderr[-2000:]
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    finally:
        observer.stop()


def test_hostile_messages_on_a_real_broker_do_not_stop_the_observer(mosquitto):
    limits = Limits(nodes_per_run=20)
    state = DashboardState(limits=limits)
    observer = BrokerObserver(mosquitto.url, state)
    observer.start()
    rogue = connect_transport(mosquitto.url, "rogue")
    rogue.connect(timeout=10)
    topics = Topics("r1")
    try:
        junk = [b"", b"\x00", b"FLRA\xff\xff\xff\xff", b"FLRA\x00\x00\x00\x02[]", b"x" * 100_000]
        for topic in (topics.status("x"), topics.metrics, topics.instruction, topics.update("x")):
            for payload in junk:
                rogue.publish(Message(topic, payload, qos=1))
        for i in range(500):
            fake = Envelope("status", "r1", f"fake-{i}", data={"state": "online", "recipe": ["x"] * 100})
            rogue.publish(Message(topics.status(f"fake-{i}"), envelope_to_bytes(fake), qos=0))
        real = Envelope("status", "r1", "jetson-1", data={"state": "online", "last_round_trained": 4})
        rogue.publish(Message(topics.status("jetson-1"), envelope_to_bytes(real), qos=1))

        def jetson_seen():
            runs = state.snapshot()["runs"]
            return runs and any(n["node"] == "jetson-1" for n in runs[0]["nodes"])

        poll("the valid status after the junk", jetson_seen)
        assert observer.alive and observer.connected
        assert len(state.snapshot()["runs"][0]["nodes"]) == limits.nodes_per_run
    finally:
        rogue.close()
        observer.stop()


def test_the_flora_dashboard_command_serves_a_broker(mosquitto):
    # The command as a user runs it: port 0 picks a free one, which the start-up line names.
    url = mosquitto.url.replace("mqtt://", "mqtt://observer:s3cret@")
    argv = [sys.executable, "-m", "flora.app", "dashboard", "--broker", url, "--port", "0"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not (found := re.search(r"dashboard of .* on (http://127\.0\.0\.1:\d+/)", seen[-1] if seen else "")):
            seen.append(process.stderr.readline())  # blocks until a log line; "" once the process has ended
            assert seen[-1], "".join(seen)
        line = seen[-1]
        assert "s3cret" not in line and "observer:***@" in line
        status, _, body = get(found.group(1) + "api/state")
        assert status == 200 and json.loads(body)["broker"].startswith("mqtt://observer:***@")
        assert get(found.group(1))[0] == 200
    finally:
        process.terminate()
        process.wait(30)
        process.stderr.close()
