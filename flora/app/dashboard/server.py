"""The dashboard's web side: a Starlette app with two GET routes, served by uvicorn.

    /            the page (page.html: inline CSS and JS, charts drawn as SVG; nothing fetched from elsewhere)
    /api/state   DashboardState.snapshot() as JSON; the page polls it every 2 s

Read-only: no route changes anything, here or on the broker. The Host header is checked, so a web page
elsewhere cannot reach a loopback dashboard through DNS rebinding, and the Content-Security-Policy lets
the page talk to this server only. The broker URL is shown with its password redacted.
"""

from __future__ import annotations

import socket
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from flora.app.dashboard.state import DashboardState
from flora.transport.base import redact_url

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS


def build_app(state: DashboardState, broker_url: str, *, allowed_hosts: list[str] | None = None) -> Starlette:
    """`allowed_hosts`: Host header values accepted (default: loopback names only)."""
    page = resources.files("flora.app.dashboard").joinpath("page.html").read_text(encoding="utf-8")
    broker = redact_url(broker_url)

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page, headers=SECURITY_HEADERS)

    async def api_state(request: Request) -> JSONResponse:
        return JSONResponse({"broker": broker, **state.snapshot()}, headers=SECURITY_HEADERS)

    return Starlette(
        routes=[Route("/", index, methods=["GET"]), Route("/api/state", api_state, methods=["GET"])],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or [*LOOPBACK_HOSTS, "[::1]"])],
    )


def make_server(app: Starlette, host: str, port: int):
    """A uvicorn server for `app` that logs only warnings (no access log: the page polls every 2 s)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so the caller knows the port (port 0: a free one) before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
