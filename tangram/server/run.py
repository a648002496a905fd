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


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def uvicorn_config(app: Any, *, log_level: str = "warning") -> uvicorn.Config:
    """One worker (the broker's state lives in this process), the C event loop and
    parser when installed, no access log (it costs more than a lease cycle)."""
    return uvicorn.Config(
        app,
        loop="uvloop" if _have("uvloop") else "asyncio",
        http="httptools" if _have("httptools") else "h11",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        # Longer than httpx's 5 s keep-alive expiry: the client closes idle connections
        # first, so it never reuses one the server is closing at that very moment.
        timeout_keep_alive=30,
    )


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
    loopback port, and stops it on exit."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn_config(app))
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
