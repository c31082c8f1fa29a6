"""`flora dashboard`: a read-only web page of a broker's fleet, rounds and their progress, live.

state.py     what is known per run, from untrusted broker messages, bounded
observer.py  the thread that reads the broker (subscribes only; publishes nothing)
server.py    the Starlette app (the page and /api/state) and its uvicorn server
page.html    the page: inline CSS and JS, SVG charts, no build step and nothing fetched from elsewhere
"""

from __future__ import annotations

import logging

from flora.errors import FloraError

log = logging.getLogger(__name__)


def serve(
    broker_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ca_file: str | None = None,
    run_id: str | None = None,
    allow_remote: bool = False,
) -> int:
    """Observe `broker_url` and serve the page until interrupted."""
    from flora.app.dashboard.observer import BrokerObserver
    from flora.app.dashboard.server import bind, build_app, is_loopback, make_server
    from flora.app.dashboard.state import DashboardState
    from flora.transport.base import redact_url

    if not is_loopback(host) and not allow_remote:
        raise FloraError(
            f"the dashboard has no login; binding {host} would show the fleet to anyone who can reach this machine. "
            "Keep it on 127.0.0.1 and use an SSH tunnel (ssh -L 8080:127.0.0.1:8080 HOST), or pass --allow-remote "
            "on a trusted network"
        )
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise FloraError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    state = DashboardState(run_id=run_id)
    observer = BrokerObserver(broker_url, state, ca_file=ca_file)
    try:
        observer.start()
        # A remote bind is reached under names we cannot know: the Host check is left to the operator then.
        app = build_app(state, broker_url, allowed_hosts=None if is_loopback(host) else ["*"])
        shown = f"[{host}]" if ":" in host else host
        log.info("dashboard of %s on http://%s:%d/", redact_url(broker_url), shown, sock.getsockname()[1])
        make_server(app, host, port).run(sockets=[sock])
    finally:
        observer.stop()
        sock.close()
    return 0
