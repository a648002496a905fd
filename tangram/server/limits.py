"""Limits that keep clients, tokens or none, from exhausting ``tangram serve``.

- Request bodies: an ASGI middleware answers 413 to a body over ``max_body_bytes``, from
  its Content-Length before reading any of it, or, for a chunked body, as soon as the
  bytes received pass the limit; the app never holds more than the limit.
- Connections: uvicorn's HTTP protocols, subclassed. A connection must send a whole
  request, head and body, within ``header_timeout_seconds`` of opening (or of the first
  byte of a later request) or it is closed; uvicorn arms no timer until a first response,
  so a socket that never speaks, or one that dribbles a head or a body, would stay open
  for ever. A head is at most MAX_HEAD_BYTES. At ``max_connections`` a new connection
  closes the one idle longest (no request in flight) rather than be refused, so idle
  sockets cannot lock a real client out; only when every connection has a request in
  flight is the new one closed. The cap is kept below what the open-file limit holds,
  since past it the server cannot even accept a connection to close another.
- Shutdown: a request still running when uvicorn's graceful-shutdown time runs out (a
  long poll) is answered 503 instead of dying as an application error.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol, cast

from starlette.requests import ClientDisconnect

from tangram.server.problems import Problem

if TYPE_CHECKING:
    from fastapi import FastAPI
    from uvicorn.server import ServerState

    from tangram.config import ServerConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A request head (request line and headers) larger than this is refused: tokens and ids are
# short, and httptools, unlike h11, would otherwise buffer a head of any size.
MAX_HEAD_BYTES = 64 * 1024
# Accepted connections wait in the listen queue; the event loop accepts a whole queue
# before any of them can close an idle one, so the queue's length must fit in the
# open-file limit beside the cap.
MAX_BACKLOG = 2048
# Files the process needs besides its connections: journal, logs, the loop's own.
RESERVED_FILES = 64
# The key on a request's scope saying that the server is shutting down.
DRAINING = "tangram.draining"


# ---------------------------------------------------------------------------------------
# Open files


def raise_open_file_limit() -> int | None:
    """Raise this process's soft RLIMIT_NOFILE to the hard one (1,024, a common soft
    limit, holds fewer connections than one idle-socket attack opens); the soft limit
    after, or None where there is no such limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    # An unlimited hard limit cannot be the soft one (macOS refuses past its per-process
    # maximum), so try smaller values down to the current one.
    wants = [hard] if hard != resource.RLIM_INFINITY else [1 << 20, 1 << 16, 10_240]
    for want in wants:
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):
            continue
    return open_file_limit()


def open_file_limit() -> int | None:
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _files_open() -> int:
    for d in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(d))
        except OSError:
            continue
    return 0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What the HTTP protocol enforces on each connection, and on all of them together."""

    header_timeout: float = 10.0
    max_connections: int = 10_000
    max_head_bytes: int = MAX_HEAD_BYTES
    backlog: int = MAX_BACKLOG
    # The configured cap when the open-file limit lowered it, to say so at start-up.
    lowered_from: int | None = None

    @classmethod
    def plan(cls, settings: ServerConfig) -> ConnectionLimits:
        """The limits for ``settings`` under this process's open-file limit (raise it
        first: raise_open_file_limit)."""
        cap, backlog, lowered = settings.max_connections, MAX_BACKLOG, None
        files = open_file_limit()
        if files is not None:
            spare = max(2, files - _files_open() - RESERVED_FILES)
            backlog = max(1, min(MAX_BACKLOG, spare // 4))
            fits = max(1, spare - backlog)
            if fits < cap:
                cap, lowered = fits, cap
        return cls(settings.header_timeout_seconds, cap, MAX_HEAD_BYTES, backlog, lowered)


# ---------------------------------------------------------------------------------------
# Connections


class _Cycle(Protocol):
    @property
    def response_complete(self) -> bool: ...
    @property
    def scope(self) -> Any: ...


class _Conn(Protocol):
    @property
    def transport(self) -> asyncio.Transport: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def cycle(self) -> _Cycle | None: ...


class _Table:
    """One server's connections: those open, and those idle, longest idle first."""

    __slots__ = ("idle", "live")

    def __init__(self) -> None:
        self.live: set[_Guard] = set()
        # An OrderedDict: taking its first key is O(1) however many went before, where a
        # dict's first key costs a scan past every deleted one.
        self.idle: OrderedDict[_Guard, None] = OrderedDict()


_TABLES: weakref.WeakKeyDictionary[ServerState, _Table] = weakref.WeakKeyDictionary()


def _table(state: ServerState) -> _Table:
    table = _TABLES.get(state)
    if table is None:
        table = _TABLES[state] = _Table()
    return table


class _Guard:
    """What one connection adds to uvicorn's protocol: the deadline for the request it is
    sending, the bound on its head, and its place among the server's idle connections."""

    __slots__ = ("conn", "head_bytes", "limits", "table", "timer")

    def __init__(self, conn: _Conn, limits: ConnectionLimits, table: _Table) -> None:
        self.conn = conn
        self.limits = limits
        self.table = table
        self.timer: asyncio.TimerHandle | None = None
        self.head_bytes = 0

    def busy(self) -> bool:
        cycle = self.conn.cycle
        return cycle is not None and not cycle.response_complete

    def opened(self) -> None:
        table = self.table
        table.live.add(self)
        table.idle[self] = None
        self._arm()
        if len(table.live) > self.limits.max_connections:
            # This one is idle too (the newest): it goes only when no other one is.
            victim = next(iter(table.idle))
            victim.close()

    def received(self, before: object, incomplete: bool, head_bytes: int) -> None:
        """After the parser took a chunk: ``before`` is the request cycle before it,
        ``incomplete`` whether a request has begun (or none has yet) and is not whole,
        ``head_bytes`` how many of the chunk's bytes went to an unfinished head."""
        if self.conn.cycle is not before:  # a request head is complete: in flight now
            self.table.idle.pop(self, None)
            self.head_bytes = 0
        elif head_bytes:
            self.head_bytes += head_bytes
            if self.head_bytes > self.limits.max_head_bytes:
                detail = f"the request head passed {self.limits.max_head_bytes} bytes"
                self.refuse(431, detail, "head-too-large")
                return
        if not incomplete:
            self._disarm()
        elif self.timer is None:
            # The first byte of a later request on a kept-alive connection: from here
            # the request has as long as a new connection's first one.
            self._arm()

    def responded(self) -> None:
        """After a response: idle again unless a pipelined request runs now."""
        if self.conn.transport.is_closing() or self.busy():
            return
        self.head_bytes = 0
        self.table.idle[self] = None
        self.table.idle.move_to_end(self)

    def draining(self) -> None:
        cycle = self.conn.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[DRAINING] = True

    def lost(self) -> None:
        self._disarm()
        self.table.idle.pop(self, None)
        self.table.live.discard(self)

    def close(self) -> None:
        self.lost()
        self.conn.transport.close()

    def refuse(self, status: int, detail: str, kind: str) -> None:
        if not self.conn.transport.is_closing():
            self.conn.transport.write(raw_problem(status, detail, kind))
        self.close()

    def _arm(self) -> None:
        self.timer = self.conn.loop.call_later(self.limits.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        # Armed only while a request is unfinished: a slow head or a slow body, whose
        # app (if it has one yet) sees the client go away.
        self.timer = None
        self.close()


def raw_problem(status: int, detail: str, kind: str) -> bytes:
    """A whole problem+json response that closes the connection, for the protocol to
    write where no app runs."""
    resp = Problem(status, detail, kind=kind, headers={"Connection": "close"}).response()
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in resp.raw_headers]
    return b"\r\n".join(head) + b"\r\n\r\n" + bytes(resp.body)


def protocol_class(limits: ConnectionLimits, *, httptools: bool) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools' parser or h11), with ``limits``."""
    return _httptools_protocol(limits) if httptools else _h11_protocol(limits)


class _Guarded:
    """What both protocols share: a ``_Guard`` that sees the connection open, close,
    answer and drain. Mixed in before uvicorn's protocol class; ``limits`` is set on
    the class that ``protocol_class`` makes."""

    limits: ConnectionLimits
    guard: _Guard

    def __init__(
        self,
        config: Any,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self.guard = _Guard(cast(_Conn, self), self.limits, _table(server_state))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.guard.opened()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # type: ignore[misc]
        self.guard.lost()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self.guard.responded()

    def shutdown(self) -> None:
        self.guard.draining()
        super().shutdown()  # type: ignore[misc]


def _httptools_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpToolsProtocol(_Guarded, HttpToolsProtocol):
        # From a request's first byte to the end of its headers, and of its body.
        in_head = False
        in_message = False

        def data_received(self, data: bytes) -> None:
            before, was_in_head = self.cycle, self.in_head
            super().data_received(data)
            # A chunk that began or ended a head holds other bytes too: count the ones
            # wholly inside a head, which bounds the head to the limit and one chunk.
            head = len(data) if was_in_head and self.in_head else 0
            self.guard.received(before, self.in_message or self.cycle is None, head)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.in_head = self.in_message = True

        def on_headers_complete(self) -> None:
            self.in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.in_message = False
            super().on_message_complete()

    GuardedHttpToolsProtocol.limits = limits
    return GuardedHttpToolsProtocol


def _h11_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(_Guarded, H11Protocol):
        def data_received(self, data: bytes) -> None:
            before = self.cycle
            super().data_received(data)
            state = self.conn.their_state
            # IDLE: a head not yet parsed, if any bytes wait (none: the rest of a body
            # answered before it was read, and the connection is idle again).
            incomplete = state is h11.SEND_BODY or (
                state is h11.IDLE and bool(self.conn.trailing_data[0])
            )
            # h11 bounds the head itself (h11_max_incomplete_event_size): count nothing.
            self.guard.received(before, incomplete, 0)

    GuardedH11Protocol.limits = limits
    return GuardedH11Protocol


# ---------------------------------------------------------------------------------------
# Request bodies and shutdown


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, without reading it; and 503,
    not a crash, for a request cut short by the end of a graceful shutdown."""

    def __init__(
        self, app: ASGIApp, max_bytes: int, too_large: Callable[[Scope], None] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large  # told of every request answered 413

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        streamed = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:  # the HTTP parser refuses it before this runs
                    declared = None
            elif name == b"transfer-encoding":
                streamed = True
        limit = self.max_bytes
        if declared is not None and declared > limit:
            detail = f"the request body has {declared} bytes; this server takes at most {limit}"
            self._refused(scope)
            await _problem(scope, send, 413, detail)
            return

        started = False
        over = False
        seen = 0

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if over:
                return  # the 413 below answers instead of whatever the app makes of it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted if streamed else receive, watched)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when its graceful shutdown time is up; the
            # client gets a retryable answer, and the log no crash per long poll.
            if started or not scope.get(DRAINING):
                raise
            await _problem(
                scope, send, 503, "the server is shutting down; retry", {"Retry-After": "1"}
            )
            return
        except ClientDisconnect:
            # Gone mid-body, or closed for sending it too slowly: no one to answer, and
            # nothing for the log (it would be one traceback per slow client).
            return
        except Exception:
            if not over or started:
                raise
        if over and not started:
            detail = f"the request body passed {limit} bytes, the most this server takes"
            self._refused(scope)
            await _problem(scope, send, 413, detail)

    def _refused(self, scope: Scope) -> None:
        if self.too_large is not None:
            self.too_large(scope)


class _TooLarge(Exception):
    pass


async def _problem(
    scope: Scope, send: Send, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    # Connection: close, since the rest of the request (a body never read) cannot be
    # told from the next one.
    problem = Problem(status, detail, headers={**(headers or {}), "Connection": "close"})
    resp = problem.response(scope.get("path"))
    await send({"type": "http.response.start", "status": status, "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


def install(
    app: FastAPI, settings: ServerConfig, too_large: Callable[[Scope], None] | None = None
) -> None:
    """Limit request bodies to ``settings.max_body_bytes``; ``too_large(scope)`` is told
    of each request refused for its body."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, too_large=too_large)
