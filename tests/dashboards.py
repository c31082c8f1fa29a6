"""A real dashboard server (uvicorn on a free loopback port) in a background thread, for tests."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.error
import urllib.request
from email.message import Message

from flora.app.dashboard.server import bind, build_app, make_server


@contextlib.contextmanager
def dashboard_server(state, broker_url: str):
    """Yields the base URL (http://127.0.0.1:PORT/) once the server answers; stops it on exit."""
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(build_app(state, broker_url), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the dashboard server did not start"
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def get(url: str, **headers) -> tuple[int, Message, bytes]:
    """(status, headers, body) of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()
