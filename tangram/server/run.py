"""Running the app under uvicorn: in the foreground (``tangram serve``) or in a thread
(tests and benchmarks, which need a real server on a free loopback port)."""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import threading
from types import TracebackType
from typing import Any

import uvicorn

from tangram.config import ServerConfig
from tangram.server.limits import ConnectionLimits, protocol_class, raise_open_file_limit


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# Seconds a shutdown waits for running requests; then uvicorn cancels them (a long poll is
# answered 503). A lease cycle's requests take milliseconds; long polls would hold a
# SIGTERM for up to max_wait_seconds.
GRACEFUL_SHUTDOWN_SECONDS = 1


def uvicorn_config(
    app: Any,
    *,
    log_level: str = "warning",
    settings: ServerConfig | None = None,
    limits: ConnectionLimits | None = None,
) -> uvicorn.Config:
    """One worker (the broker's state lives in this process), the C event loop and
    parser when installed, no access log (it costs more than a lease cycle). Connections
    are bounded (limits.py) by ``limits``, or else as ``settings`` say under the present
    open-file limit; ``settings`` default to the app's own (see create_app)."""
    if limits is None:
        limits = ConnectionLimits.plan(settings if settings is not None else app_settings(app))
    return uvicorn.Config(
        app,
        loop="uvloop" if _have("uvloop") else "asyncio",
        http=protocol_class(limits, httptools=_have("httptools")),
        lifespan="on",
        # No WebSocket routes: an upgrade request is served as a plain request.
        ws="none",
        access_log=False,
        log_level=log_level,
        # Longer than httpx's 5 s keep-alive expiry: the client closes idle connections
        # first, so it never reuses one the server is closing at that very moment.
        timeout_keep_alive=30,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        backlog=limits.backlog,
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )


def app_settings(app: Any) -> ServerConfig:
    """The ServerConfig an app from create_app serves with; defaults for any other app."""
    state = getattr(app, "state", None)
    service = getattr(state, "service", None) if state is not None else None
    settings = getattr(service, "settings", None)
    return settings if isinstance(settings, ServerConfig) else ServerConfig.model_validate({})


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the server starts so the
    start-up line can say the real address."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class LiveServer:
    """``with LiveServer(app) as url:`` serves ``app`` with uvicorn in a thread on a free
    loopback port, and stops it on exit (within about 1.2 s, long polls open or not).
    ``settings`` default to the app's own; the process's open-file limit is raised, as
    ``tangram serve`` does."""

    def __init__(
        self,
        app: Any,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        settings: ServerConfig | None = None,
    ) -> None:
        raise_open_file_limit()
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn_config(app, settings=settings))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> str:
        self._thread.start()
        for _ in range(1000):  # at most 10 s
            if self.server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.01)
        if not self.server.started:
            raise RuntimeError(f"uvicorn did not start on {self.url}")
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
