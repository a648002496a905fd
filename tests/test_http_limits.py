"""Exhaustion limits of the real server: request bodies, request heads, idle connections,
the open-file limit, and shutdown with long polls open (docs/http-api.md, "Limits")."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tangram.config import parse_config
from tangram.server import LiveServer, create_app, run

resource = pytest.importorskip("resource")
if not Path("/proc/self/fd").is_dir():
    pytest.skip("needs /proc (Linux) to watch the server's files", allow_module_level=True)

POOLS: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 2, "memory_gb": 8}]},
}
HOG = {"trajectory": "hog", "demands": {"cpu": 2}}  # takes every core
QUEUED = {"trajectory": "t", "demands": {"cpu": 1}}  # then waits for ever
IDLE_SOCKETS = 3000


def live(**server: Any) -> LiveServer:
    return LiveServer(create_app(parse_config({"pools": POOLS, "server": server})))


@pytest.fixture(params=["httptools", "h11"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The HTTP parser LiveServer's uvicorn uses (httptools when installed, else h11)."""
    have = importlib.util.find_spec
    if request.param == "httptools" and have("httptools") is None:
        pytest.skip("httptools is not installed")
    if request.param == "h11":
        monkeypatch.setattr(run, "_have", lambda m: m != "httptools" and have(m) is not None)
    return str(request.param)


def address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    return host, int(port)


def raw(url: str, data: bytes, timeout: float = 5) -> tuple[bytes, float]:
    """Send ``data`` on a new connection; what comes back until the server closes it,
    and the seconds that took."""
    with socket.create_connection(address(url), timeout=timeout) as s:
        t0 = time.monotonic()
        with contextlib.suppress(OSError):  # closed before all of it went: read on
            s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got, time.monotonic() - t0


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def problem_of(response: bytes) -> dict[str, Any]:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/problem+json" in head.lower()
    assert b"connection: close" in head.lower()
    return dict(json.loads(body))


def server_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def many_files() -> Iterator[None]:
    """Room in this process for the idle sockets it opens."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = IDLE_SOCKETS + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the hard open-file limit ({hard}) is under {need}")
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def serve(
    data_dir: Path, files: tuple[int, int] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """``tangram serve`` on a free port; ``files``: its open-file limits (soft, hard), set
    before it starts, as a shell's ``ulimit -n`` would."""
    args = ["serve", "--port", "0", "--data-dir", str(data_dir)]
    if files is None:
        cmd = [sys.executable, "-m", "tangram.cli", *args]
    else:
        code = (
            "import resource, runpy, sys; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, {files}); "
            f"sys.argv = ['tangram', *{args!r}]; "
            "runpy.run_module('tangram.cli', run_name='__main__', alter_sys=True)"
        )
        cmd = [sys.executable, "-c", code]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ
    )
    info = data_dir / "serve.json"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if info.exists() and info.read_text().endswith("\n"):
            return proc, str(json.loads(info.read_text())["url"])
        if proc.poll() is not None:
            raise AssertionError(f"tangram serve exited: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("tangram serve did not start")


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def open_idle(url: str, n: int, limit: float = 10) -> list[socket.socket]:
    """``n`` connections that never send a byte, once connected (or ``limit`` s)."""
    socks, poller = [], select.poll()
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(address(url))
        socks.append(s)
        poller.register(s, select.POLLOUT)
    pending, end = len(socks), time.monotonic() + limit
    while pending and time.monotonic() < end:
        for fd, _ in poller.poll(100):
            poller.unregister(fd)
            pending -= 1
    return socks


def settle(pid: int, limit: float = 3) -> int:
    """The server's open files once it has accepted what it will (unchanged for 0.2 s)."""
    last, same, end = -1, 0, time.monotonic() + limit
    while time.monotonic() < end and same < 4:
        now = server_files(pid)
        same = same + 1 if now == last else 0
        last = now
        time.sleep(0.05)
    return last


def closed_by_server(socks: list[socket.socket]) -> int:
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)
    return len(poller.poll(0))  # readable without a request sent: EOF or reset


# ---------------------------------------------------------------------------------------
# Request bodies


def test_a_body_over_the_limit_is_answered_413_without_being_read(parser: str):
    with live(max_body_bytes=1000) as url:
        head = "POST /v1/actions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        # Content-Length over the limit: answered before any of the body is sent.
        got, took = raw(url, f"{head}Content-Length: 1073741824\r\n\r\n".encode())
        assert status_of(got) == 413 and took < 1
        problem = problem_of(got)
        assert problem["type"] == "https://tangram.dev/problems/too-large"
        assert problem["status"] == 413 and problem["title"]
        assert "1073741824 bytes" in problem["detail"] and "1000" in problem["detail"]
        # Chunked: refused once the chunks pass the limit, the rest never read.
        chunks = b"".join(b"%x\r\n%s\r\n" % (400, b"x" * 400) for _ in range(10_000))
        got, _ = raw(url, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks)
        assert status_of(got) == 413
        assert "passed 1000 bytes" in problem_of(got)["detail"]
        # At the limit exactly the body goes to the app, which judges it (not JSON: 422).
        body = b"x" * 1000
        for framed in (
            b"Content-Length: 1000\r\n\r\n" + body,
            b"Transfer-Encoding: chunked\r\n\r\n3e8\r\n" + body + b"\r\n0\r\n\r\n",
        ):
            got, _ = raw(url, f"{head}Connection: close\r\n".encode() + framed)
            assert status_of(got) == 422
        with httpx.Client(base_url=url) as c:
            # A client that sends its whole body first still reads the answer.
            r = c.post("/v1/actions", content=b" " * 5_000_000)
            assert r.status_code == 413
            assert r.headers["content-type"] == "application/problem+json"
            # And requests under the limit are served as before, on new connections.
            ok = {"trajectory": "ok", "demands": {"cpu": 1}}
            r = c.post("/v1/actions", json=ok, params={"wait": 5})
            assert r.status_code == 200 and r.json()["state"] == "granted"


def test_a_huge_body_does_not_grow_the_server(tmp_path: Path):
    proc, url = serve(tmp_path)
    try:
        before = peak_rss_mib(proc.pid)

        def chunks() -> Iterator[bytes]:
            block = b"y" * (1 << 20)
            for _ in range(256):  # 256 MiB, far more than the default 1 MiB limit
                yield block

        with httpx.Client(base_url=url, timeout=10) as c:
            r = c.post("/v1/actions", content=chunks())  # chunked: no Content-Length
            assert r.status_code == 413, r.text
            assert r.json()["detail"].startswith("the request body passed 1048576 bytes")
            head = b"POST /v1/actions HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n"
            got, _ = raw(url, head + b"z" * (1 << 20))
            assert status_of(got) == 413
            assert c.get("/healthz").status_code == 200
        grown = peak_rss_mib(proc.pid) - before
        print(f"peak RSS {before:.0f} MiB before, +{grown:.1f} MiB after a 256 MiB body")
        assert grown < 32
    finally:
        stop(proc)


# ---------------------------------------------------------------------------------------
# Request heads and idle connections


def test_a_request_not_whole_within_the_header_timeout_is_closed(parser: str):
    with live(header_timeout_seconds=0.5) as url:
        silent = socket.create_connection(address(url))
        t0 = time.monotonic()
        partial, _ = raw(url, b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # no blank line
        took = time.monotonic() - t0
        assert partial == b"" and 0.4 < took < 2
        silent.settimeout(2)
        assert silent.recv(1) == b""  # closed too, having sent nothing
        silent.close()
        # A body that stops short: the same deadline, from the request's first byte.
        head = b"POST /v1/actions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n"
        partial, took = raw(url, head + b'{"trajectory": ')
        assert partial == b"" and 0.4 < took < 2
        # A kept-alive connection between requests is not waiting on a head: it stays
        # open past the header timeout (until the 30 s keep-alive timeout).
        with socket.create_connection(address(url), timeout=5) as s:
            ask = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
            s.sendall(ask)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            time.sleep(1)
            s.sendall(ask)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            # A head dribbled on a kept-alive connection has the same deadline.
            s.sendall(b"GET /healthz HTTP/1.1\r\n")
            t0 = time.monotonic()
            assert s.recv(65536) == b""
            assert 0.4 < time.monotonic() - t0 < 2


def test_a_request_head_over_64_kib_is_refused(parser: str):
    with live() as url:
        got, _ = raw(url, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 200_000)
        if parser == "httptools":
            assert status_of(got) == 431
            assert problem_of(got)["type"] == "https://tangram.dev/problems/head-too-large"
        else:  # h11's own bound (h11_max_incomplete_event_size), with its plain answer
            assert status_of(got) == 400
        # Headers just under the bound are fine.
        got, _ = raw(url, b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"X-Pad: " + b"p" * 60_000 + b"\r\n\r\n")  # fmt: skip
        assert status_of(got) == 200


def test_at_the_connection_cap_idle_connections_go_first(parser: str):
    with live(max_connections=50) as url, httpx.Client(base_url=url, timeout=10) as c:
        assert c.post("/v1/actions", json=HOG, params={"wait": 5}).json()["state"] == "granted"
        polled: list[httpx.Response | BaseException] = []

        def long_poll() -> None:
            try:
                with httpx.Client(base_url=url, timeout=10) as own:
                    polled.append(own.post("/v1/actions", json=QUEUED, params={"wait": 2}))
            except BaseException as exc:
                polled.append(exc)

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.3)  # its connection is the oldest but one, and busy
        idle = open_idle(url, 200)
        try:
            time.sleep(0.3)
            t0 = time.monotonic()
            with httpx.Client(base_url=url, timeout=1) as fresh:
                assert fresh.get("/healthz").status_code == 200
            assert time.monotonic() - t0 < 1
            assert closed_by_server(idle) >= 150  # the oldest idle ones, to stay at 50
        finally:
            for s in idle:
                s.close()
        poller.join(10)
        # The long poll, busy throughout, was never chosen: it ends with its answer.
        assert len(polled) == 1 and isinstance(polled[0], httpx.Response), polled
        assert polled[0].status_code == 202 and polled[0].json()["state"] == "queued"


@pytest.mark.parametrize(
    "files",
    [
        pytest.param((1024, None), id="soft-1024"),  # raised to the hard limit at start
        pytest.param((1024, 1024), id="hard-1024"),  # the cap kept under it instead
    ],
)
def test_idle_sockets_do_not_lock_out_a_real_client(
    tmp_path: Path, many_files: None, files: tuple[int, int | None]
):
    soft, hard = files
    if hard is None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < IDLE_SOCKETS + 200:
            pytest.skip(f"the hard open-file limit ({hard}) holds no {IDLE_SOCKETS} sockets")
    proc, url = serve(tmp_path, (soft, hard))
    idle: list[socket.socket] = []
    try:
        idle = open_idle(url, IDLE_SOCKETS)  # no token needed to open a socket
        held = settle(proc.pid)
        t0 = time.monotonic()
        with httpx.Client(base_url=url, timeout=1) as c:
            real = {"trajectory": "real", "demands": {"cpu": 1}}
            r = c.post("/v1/actions", json=real)
        took = time.monotonic() - t0
        print(f"{held} files open in the server; the real client served in {took:.3f} s")
        assert r.status_code in (200, 202) and r.json()["state"] in ("granted", "queued")
        assert took < 1
        if files[1] is None:
            assert held > IDLE_SOCKETS  # every idle socket fits
        else:
            assert held <= 1024  # the oldest idle ones were closed to make room
    finally:
        for s in idle:
            s.close()
        stop(proc)


# ---------------------------------------------------------------------------------------
# Shutdown


def test_sigterm_with_open_long_polls_exits_within_2_s(tmp_path: Path):
    proc, url = serve(tmp_path)
    answers: list[httpx.Response | BaseException] = []
    try:
        r = httpx.post(url + "/v1/actions?wait=5", json=HOG)
        assert r.json()["state"] == "granted"

        def long_poll(i: int) -> None:
            try:
                body = {"trajectory": f"t{i}", "demands": {"cpu": 1}}
                answers.append(httpx.post(url + "/v1/actions?wait=60", json=body, timeout=30))
            except BaseException as exc:
                answers.append(exc)

        polls = [threading.Thread(target=long_poll, args=(i,)) for i in range(3)]
        for t in polls:
            t.start()
        time.sleep(0.5)
        assert not answers
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            raise AssertionError("tangram serve still runs 2 s after SIGTERM") from None
        took = time.monotonic() - t0
        print(f"exited {took:.2f} s after SIGTERM with 3 long polls open")
        assert proc.returncode in (0, -signal.SIGTERM)
        for t in polls:
            t.join(5)
        # Each long poll gets an answer it can retry, not a dropped connection.
        assert len(answers) == 3
        for r in answers:
            assert isinstance(r, httpx.Response), r
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["type"] == "https://tangram.dev/problems/unavailable"
        assert "Exception in ASGI application" not in err
    finally:
        stop(proc)


def test_live_server_stop_with_an_open_long_poll_takes_under_2_s(parser: str):
    server = live()
    url = server.start()
    answers: list[int] = []
    try:
        r = httpx.post(url + "/v1/actions?wait=5", json=HOG)
        assert r.json()["state"] == "granted"

        def long_poll() -> None:
            r = httpx.post(url + "/v1/actions?wait=60", json=QUEUED, timeout=30)
            answers.append(r.status_code)

        t = threading.Thread(target=long_poll, daemon=True)
        t.start()
        time.sleep(0.3)
    finally:
        t0 = time.monotonic()
        server.stop()
        took = time.monotonic() - t0
    t.join(5)
    assert took < 2 and answers == [503]
