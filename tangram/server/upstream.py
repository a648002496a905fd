"""The gateway's HTTP/1.1 client for its upstreams: pooled keep-alive connections,
``POST`` only, the answer's body handed over chunk by chunk as it arrives.

Why not httpx or aiohttp: a forwarded call is the gateway's whole job, and their layers
cost more CPU than the call's lease, scheduling and relay together (httpx's pool checks
every idle connection's socket on each request: about 2.3 ms per call at 16 connections
here; aiohttp about 0.2 ms but most of the gateway's Python time under load). This
client is one ``asyncio.Protocol`` per connection around httptools' C parser (uvicorn's),
which also undoes the chunked transfer encoding. It does no redirects, no cookies, no
decompression and no proxies: the gateway relays the upstream's bytes as they are.

A connection is reused only after a complete answer that allows keep-alive, and dropped
when idle longer than ``keepalive``. A call on a reused connection that the upstream had
closed (nothing received) is sent once more on a new connection, as an idle connection
may be closed by the server at any time.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

# Body bytes buffered from the upstream before reading pauses (the client reads slower).
HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """The upstream could not be reached, closed the connection mid-answer, or sent what
    is not HTTP/1.1."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connecting, or waiting for the next bytes of the answer, took too long."""


class _Conn(asyncio.Protocol):
    """One connection; at most one call on it at a time."""

    def __init__(self, key: tuple[str, int, bool]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: BaseException | None = None
        self.received = False
        self.paused = False
        self.until_close = False
        self.keep_alive = False

    # ---- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed HTTP answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        if self.until_close and self.head is not None and self.head.done():
            self.on_message_complete()  # no length, no chunks: the body ends with the stream
            return
        what = f": {exc}" if exc else ""
        self._fail(UpstreamError(f"the upstream closed the connection{what}"))

    def pause_writing(self) -> None:  # requests are small; nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # ---- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        framed = any(
            k.lower() in (b"content-length", b"transfer-encoding") for k, _ in self.headers
        )
        self.until_close = not framed
        if self.head is not None and not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        # Asked here: once the parser has moved past the message it answers False.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # ---- the call ---------------------------------------------------------------------------
    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        for fut in (self.head, self.waiter):
            if fut is not None and not fut.done():
                fut.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return self.complete and not self.closed and self.keep_alive


async def _within(fut: asyncio.Future[Any], timeout: float | None, what: str) -> None:
    """Wait for ``fut`` at most ``timeout`` seconds (a timer, not a task per wait)."""
    if fut.done():
        fut.result()
        return
    if timeout is None:
        await fut
        return
    loop = asyncio.get_running_loop()

    def expire() -> None:
        if not fut.done():
            fut.set_exception(UpstreamTimeout(f"no answer within {timeout} s ({what})"))

    timer = loop.call_later(timeout, expire)
    try:
        await fut
    finally:
        timer.cancel()


class Answer:
    """An upstream's answer: status and raw headers at once, the body as it arrives.
    ``close`` hands the connection back for reuse (complete answers) or closes it."""

    def __init__(self, pool: Upstreams, conn: _Conn, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout = read_timeout
        self.status = conn.status
        self.headers = conn.headers
        self._released = False

    def header(self, name: bytes) -> str | None:
        """The first header ``name`` (lower case), decoded; None if absent."""
        for k, v in self.headers:
            if k.lower() == name:
                return v.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk (transfer encoding undone); ``UpstreamTimeout`` when
        the next bytes take longer than the read timeout, ``UpstreamError`` when the
        connection ends before the answer does."""
        conn = self._conn
        loop = asyncio.get_running_loop()
        while True:
            while conn.chunks:
                chunk = conn.chunks.popleft()
                conn.buffered -= len(chunk)
                if conn.paused and conn.buffered <= HIGH_WATER // 2 and conn.transport:
                    conn.transport.resume_reading()
                    conn.paused = False
                yield chunk
            if conn.complete:
                return
            if conn.error is not None:
                raise conn.error
            conn.waiter = loop.create_future()
            try:
                await _within(conn.waiter, self._timeout, "reading the answer")
            finally:
                conn.waiter = None

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool._put(self._conn)


class Upstreams:
    """Pooled connections to every upstream, at most ``max_connections`` at once."""

    def __init__(self, max_connections: int = 1000, keepalive: float = 30.0) -> None:
        self.keepalive = keepalive
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int, bool], list[_Conn]] = {}
        self._busy: set[_Conn] = set()
        self._urls: dict[str, tuple[tuple[str, int, bool], bytes, bytes]] = {}
        self._tls: ssl.SSLContext | None = None

    def connections(self) -> int:
        """Open connections, idle and in use."""
        return len(self._busy) + sum(len(v) for v in self._idle.values())

    def _target(self, url: str) -> tuple[tuple[str, int, bool], bytes, bytes]:
        got = self._urls.get(url)
        if got is None:
            u = urlsplit(url)
            tls = u.scheme == "https"
            host = u.hostname or ""
            port = u.port or (443 if tls else 80)
            default = port == (443 if tls else 80)
            host_header = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
            path = (u.path or "/") + (f"?{u.query}" if u.query else "")
            got = self._urls[url] = ((host, port, tls), path.encode(), host_header.encode())
        return got

    async def _connect(self, key: tuple[str, int, bool], timeout: float | None) -> _Conn:
        host, port, tls = key
        ctx: ssl.SSLContext | None = None
        if tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            ctx = self._tls
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Conn(key), host, port, ssl=ctx, server_hostname=host if tls else None
                ),
                timeout,
            )
        except TimeoutError:
            raise UpstreamTimeout(
                f"could not connect to {host}:{port} within {timeout} s"
            ) from None
        except OSError as exc:
            raise UpstreamError(f"could not connect to {host}:{port}: {exc}") from None
        return conn

    def _take_idle(self, key: tuple[str, int, bool]) -> _Conn | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                conn.reused = True
                return conn
            conn.close()
        return None

    def _put(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        self._slots.release()
        if conn.reusable:
            conn._reset()
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            conn.close()

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
    ) -> Answer:
        """Send ``POST url`` with ``body``; return once the answer's head arrived. The
        caller must ``close()`` the answer. ``connect_timeout`` covers waiting for a
        free connection and connecting; ``read_timeout`` each wait for bytes after."""
        key, path, host = self._target(url)
        head = [b"POST ", path, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
        for k, v in headers.items():
            head += [k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n"]
        head += [b"Content-Length: ", str(len(body)).encode(), b"\r\n\r\n"]
        request = b"".join(head) + body
        loop = asyncio.get_running_loop()
        if self._slots.locked():  # every connection busy: wait, within the timeout
            try:
                await asyncio.wait_for(self._slots.acquire(), connect_timeout)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"no free upstream connection within {connect_timeout} s "
                    f"({len(self._busy)} in use)"
                ) from None
        else:
            await self._slots.acquire()  # free: returns at once
        conn: _Conn | None = None
        try:
            for attempt in (0, 1):
                conn = self._take_idle(key) if attempt == 0 else None
                if conn is None:
                    conn = await self._connect(key, connect_timeout)
                self._busy.add(conn)
                conn.head = loop.create_future()
                assert conn.transport is not None
                conn.transport.write(request)
                try:
                    await _within(conn.head, read_timeout, "waiting for the answer's head")
                except UpstreamTimeout:
                    raise
                except UpstreamError:
                    # An idle connection the server closed before reading this call.
                    if attempt == 0 and conn.reused and not conn.received:
                        self._busy.discard(conn)
                        conn.close()
                        continue
                    raise
                return Answer(self, conn, read_timeout)
            raise AssertionError("unreachable")
        except BaseException:
            if conn is not None:
                self._busy.discard(conn)
                conn.close()
            self._slots.release()
            raise

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        for conn in list(self._busy):
            conn.close()
