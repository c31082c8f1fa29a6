"""The dashboard's web side on a real uvicorn: the page, its JSON, and what it refuses."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from flora.app.dashboard.state import DashboardState
from flora.protocol import Envelope, Topics, envelope_to_bytes
from tests.dashboards import dashboard_server, get


def test_page_and_state_are_served_read_only_without_the_password():
    state = DashboardState()
    topics = Topics("r1")
    state.handle(
        topics.status("jetson-1"), envelope_to_bytes(Envelope("status", "r1", "jetson-1", data={"state": "online"}))
    )
    with dashboard_server(state, "mqtt://observer:s3cret@broker.local:1883") as base:
        status, headers, body = get(base)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert (
            "default-src 'none'" in headers["Content-Security-Policy"]
            and "connect-src 'self'" in headers["Content-Security-Policy"]
        )
        page = body.decode()
        assert "<script" in page and "src=" not in page.replace('"svg:', "")  # nothing loaded from elsewhere
        assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page

        status, headers, body = get(base + "api/state")
        assert status == 200 and headers["Content-Type"] == "application/json"
        snapshot = json.loads(body)
        assert snapshot["broker"] == "mqtt://observer:***@broker.local:1883" and b"s3cret" not in body
        assert snapshot["runs"][0]["nodes"][0]["node"] == "jetson-1"

        post = urllib.request.Request(base + "api/state", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(post, timeout=10)
            raise AssertionError("POST was accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 405
        # DNS rebinding: a page served under another name must not be able to read the dashboard.
        assert get(base + "api/state", Host="evil.example.com")[0] == 400
        assert get(base + "api/state", Host="localhost")[0] == 200


def test_a_public_bind_is_refused_without_the_flag():
    result = subprocess.run(
        [sys.executable, "-m", "flora.app", "dashboard", "--broker", "mqtt://127.0.0.1:1", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--allow-remote" in result.stderr and "Traceback" not in result.stderr


def test_an_unreachable_broker_is_reported_not_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "flora.app", "dashboard", "--broker", "mqtt://u:pw9@127.0.0.1:1", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "cannot reach broker" in result.stderr and "Traceback" not in result.stderr
    assert "pw9" not in result.stderr
