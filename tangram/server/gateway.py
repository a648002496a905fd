"""The OpenAI-compatible gateway: calls to a model lease its pool, then go upstream.

A call to ``POST /v1/chat/completions`` or ``POST /v1/completions`` names a ``model``;
the configuration (``gateway.models``) names the pool its calls lease and the
OpenAI-compatible server they are forwarded to. The gateway is one more client of the
broker the lease API serves: it submits an action for the caller's tenant, waits in the
queue like any other, forwards the request's bytes unchanged once granted, relays the
answer (server-sent events byte for byte), and releases the lease with the usage the
upstream reported, when the answer ends, the client leaves, the upstream fails or times
out. An upstream 429 is answered 429 with its ``Retry-After``, and the call's units stay
held that long (at most ``max_hold_seconds``), so the pool admits fewer calls while the
upstream sheds load. See docs/http-api.md, "OpenAI-compatible gateway"."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from starlette.responses import Response

from tangram import wire
from tangram.config import GatewayConfig, GatewayModelConfig
from tangram.errors import (
    ActionCancelled,
    InvalidAction,
    QueueFull,
    TangramError,
    Unavailable,
)
from tangram.leasing import LeaseContext
from tangram.server.models import MAX_NAME
from tangram.server.service import Service
from tangram.server.upstream import Answer, UpstreamError, Upstreams, UpstreamTimeout
from tangram.spec import Action, Lease

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = "application/json"
TRAJECTORY_HEADER = "x-tangram-trajectory"
LEASE_HEADER = b"x-tangram-lease"
# Headers that describe one hop, not the answer: never relayed. ``date`` and ``server``
# are the gateway's own (uvicorn adds them).
HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"content-length",
        b"date",
        b"server",
        b"proxy-connection",
        b"upgrade",
        b"te",
        b"trailer",
    }
)
MAX_TAIL = 1 << 20  # the most of an unfinished event line the usage scanner keeps
MAX_BODY = 64 << 20  # the most of a non-streamed upstream answer the gateway relays


class UpstreamFailed(Exception):
    """The upstream answered 429 or failed: the lease is released as an error."""


class AnswerTooLarge(Exception):
    """A non-streamed upstream answer passed ``MAX_BODY``."""


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> bytes:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


_KIND_OF = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("upstream_error", "bad_gateway"),
    503: ("service_unavailable", "unavailable"),
    504: ("timeout", "upstream_timeout"),
}


def openai_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    kind, default_code = _KIND_OF.get(status, ("api_error", None))
    body = error_body(message, kind, code or default_code, param)
    return Response(body, status, headers, media_type=JSON)


def tangram_error(exc: TangramError, retry_after: int) -> tuple[int, str, dict[str, str]]:
    """Status, message and headers of an error the broker raised for a gateway call."""
    if isinstance(exc, QueueFull):
        return 429, str(exc), {"Retry-After": str(max(1, round(exc.retry_after)))}
    if isinstance(exc, InvalidAction):
        return 400, str(exc), {}
    if isinstance(exc, Unavailable):
        return 503, str(exc), {"Retry-After": str(max(1, round(exc.retry_after)))}
    if isinstance(exc, ActionCancelled):
        return 503, str(exc), {"Retry-After": str(retry_after)}
    return 500, f"{type(exc).__name__}: {exc}", {}


def retry_after_of(value: str | None, default: float) -> float:
    """Seconds from a ``Retry-After`` header (seconds, or an HTTP date)."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def usage_tokens(usage: Any) -> dict[str, int] | None:
    """What a release reports from an OpenAI ``usage`` object: ``tokens`` (the total,
    what a tokens-per-minute pool charges), with the prompt's and the completion's."""
    if not isinstance(usage, dict):
        return None
    out: dict[str, int] = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = usage.get(key)
        if isinstance(v, int) and not isinstance(v, bool):
            out[key] = v
    total = out.get("total_tokens")
    if total is None and ("prompt_tokens" in out or "completion_tokens" in out):
        total = out.get("prompt_tokens", 0) + out.get("completion_tokens", 0)
    if total is None:
        return None
    out["tokens"] = total
    return out


class UsageScanner:
    """Finds the last ``usage`` object in a stream of server-sent events as it passes,
    without changing a byte: only lines that mention ``"usage"`` are parsed."""

    __slots__ = ("tail", "usage")

    def __init__(self) -> None:
        self.tail = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        data = self.tail + chunk if self.tail else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self.tail = data if len(data) <= MAX_TAIL else b""
            return
        self.tail = data[end + 1 :]
        if len(self.tail) > MAX_TAIL:
            self.tail = b""
        done = data[:end]
        if b'"usage"' not in done:
            return
        for line in done.split(b"\n"):
            if line.startswith(b"data:") and b'"usage"' in line:
                try:
                    obj = orjson.loads(line[5:].strip())
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    self.usage = obj["usage"]


class Gateway:
    """The gateway's state: its models and one pool of upstream connections
    (tangram.server.upstream: no cookies, no redirects, no proxies from the environment,
    no decompression; the bytes are relayed as sent)."""

    def __init__(self, cfg: GatewayConfig, svc: Service) -> None:
        self.cfg = cfg
        self.svc = svc
        self.models: dict[str, GatewayModelConfig] = dict(cfg.models)
        self._upstreams: Upstreams | None = None
        self._holds: set[asyncio.Task[None]] = set()

    @property
    def upstreams(self) -> Upstreams:
        """Made on first use, inside the server's event loop."""
        if self._upstreams is None:
            self._upstreams = Upstreams(self.cfg.max_connections, keepalive=30.0)
        return self._upstreams

    def connections(self) -> int:
        """Open upstream connections, idle and in use (for tests and status)."""
        return 0 if self._upstreams is None else self._upstreams.connections()

    async def aclose(self) -> None:
        """Release the leases held back after upstream 429s; close the connections."""
        for task in list(self._holds):
            task.cancel()
        if self._holds:
            await asyncio.wait(self._holds, timeout=5)
        if self._upstreams is not None:
            await self._upstreams.aclose()
            self._upstreams = None

    def action(
        self, model: str, m: GatewayModelConfig, body: dict[str, Any], size: int, scope: Scope,
        tenant: str | None,
    ) -> Action:  # fmt: skip
        """The action a call leases: the model's pool and demand, the caller's tenant and
        trajectory (``X-Tangram-Trajectory``, else ``gateway:MODEL``)."""
        trajectory = f"gateway:{model}"
        for k, v in scope["headers"]:
            if k == b"x-tangram-trajectory":
                trajectory = v.decode("latin-1").strip() or trajectory
                if len(trajectory) > MAX_NAME:
                    raise InvalidAction(
                        f"X-Tangram-Trajectory has {len(trajectory)} characters; at most {MAX_NAME}"
                    )
                break
        tokens = m.tokens
        if tokens is None:
            most = body.get("max_completion_tokens") or body.get("max_tokens")
            if isinstance(most, int) and not isinstance(most, bool) and most > 0:
                tokens = most + size // 4  # about four bytes a token for the prompt
        action = Action.build(
            wire.namespaced(tenant, trajectory),
            {m.pool: m.demand},
            task=model,
            service=m.service,
            tokens=tokens,
            tenant=tenant,
        )
        return action

    def hold(self, ctx: LeaseContext[Action, Lease], seconds: float) -> None:
        """Keep the call's units ``seconds`` more (after an upstream 429), then release."""
        task = asyncio.get_running_loop().create_task(_hold(ctx, seconds))
        self._holds.add(task)
        task.add_done_callback(self._holds.discard)


async def _hold(ctx: LeaseContext[Action, Lease], seconds: float) -> None:
    try:
        await asyncio.sleep(seconds)
    finally:
        ctx.report(tokens=0)
        await ctx.__aexit__(UpstreamFailed, UpstreamFailed("429"), None)


class Call(Response):
    """One forwarded call as an ASGI response: lease (waiting in the queue), forward,
    relay, release. A client that leaves at any point cancels what runs then: an action
    still queued leaves the queue, a held lease is released (with the usage seen so far),
    the upstream connection is closed."""

    def __init__(
        self,
        gw: Gateway,
        ctx: LeaseContext[Action, Lease],
        url: str,
        raw: bytes,
        m: GatewayModelConfig,
    ) -> None:
        # Not Response.__init__: this response writes itself.
        self.gw = gw
        self.ctx = ctx
        self.url = url
        self.raw = raw
        self.m = m
        self.background = None
        self.status_code = 200
        self.started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Two tasks, not a watcher that cancels this one: the watcher also ends when the
        # answer is complete, and a late cancel would land in whatever runs next.
        sent = False

        async def tracked(message: Message) -> None:
            nonlocal sent
            if message["type"] == "http.response.body" and not message.get("more_body"):
                sent = True
            await send(message)

        run = asyncio.ensure_future(self.run(tracked))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((run, gone), return_when=asyncio.FIRST_COMPLETED)
            if sent and not run.done():
                # The server ends the watcher once the answer is complete too; the call
                # then finishes on its own (the upstream connection back to the pool,
                # the release with outcome "ok").
                await asyncio.wait((run,))
        finally:
            # The client left (or this server stops): stop the call where it is.
            for task in (run, gone):
                if not task.done():
                    task.cancel()
            await asyncio.wait((run, gone))
        if not run.cancelled() and run.exception() is not None:
            raise run.exception()  # type: ignore[misc]

    async def _error(self, send: Send, status: int, message: str, headers: dict[str, str]) -> None:
        resp = openai_error(status, message, headers=headers)
        await self._start(send, status, resp.raw_headers)
        await send({"type": "http.response.body", "body": resp.body})

    async def _start(self, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status
        self.started = True
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def run(self, send: Send) -> None:
        gw, ctx, m = self.gw, self.ctx, self.m
        retry = gw.svc.settings.retry_after_seconds
        try:
            lease = await ctx.__aenter__()
        except TimeoutError:
            wait = gw.cfg.queue_timeout_seconds
            await self._error(
                send,
                429,
                f"waited {wait:g} s in the queue of pool {m.pool!r} without a grant; retry later",
                {"Retry-After": str(retry)},
            )
            return
        except TangramError as exc:
            status, message, headers = tangram_error(exc, retry)
            await self._error(send, status, message, headers)
            return
        failed: BaseException | None = None
        try:
            failed = await self.forward(send, lease)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            if failed is None:
                await ctx.__aexit__(None, None, None)
            elif not isinstance(failed, _Held):
                await ctx.__aexit__(type(failed), failed, None)

    async def forward(self, send: Send, lease: Lease) -> BaseException | None:
        """Forward and relay; what failed (None: the call went through)."""
        gw, m = self.gw, self.m
        headers = {"content-type": JSON, "accept-encoding": "identity"}
        if m.api_key is not None:
            headers["authorization"] = f"Bearer {m.api_key}"
        lease_id = lease.id.encode()
        try:
            upstream = await gw.upstreams.post(
                self.url,
                self.raw,
                headers,
                connect_timeout=gw.cfg.queue_timeout_seconds,
                read_timeout=m.timeout_seconds,
            )
        except UpstreamTimeout as exc:
            await self._error(
                send, 504, f"upstream {m.upstream} did not answer in {m.timeout_seconds:g} s", {}
            )
            return exc
        except UpstreamError as exc:
            await self._error(send, 502, f"upstream {m.upstream} failed: {exc}", {})
            return exc
        try:
            return await self.relay(send, upstream, lease_id)
        finally:
            upstream.close()

    async def relay(self, send: Send, upstream: Answer, lease_id: bytes) -> BaseException | None:
        gw, ctx, m = self.gw, self.ctx, self.m
        head = [(k, v) for k, v in upstream.headers if k.lower() not in HOP]
        head.append((LEASE_HEADER, lease_id))
        kind = upstream.header(b"content-type") or ""
        streamed = kind.startswith("text/event-stream")
        try:
            if streamed and upstream.status == 200:
                scanner = UsageScanner()
                await self._start(send, 200, head)
                try:
                    async for chunk in upstream.chunks():
                        scanner.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finally:
                    used = usage_tokens(scanner.usage)
                    if used is not None:
                        ctx.report(**used)
                await send({"type": "http.response.body", "body": b""})
                return None
            parts = []
            size = 0
            async for chunk in upstream.chunks():
                size += len(chunk)
                if size > MAX_BODY:
                    raise AnswerTooLarge(f"the answer passed {MAX_BODY} bytes")
                parts.append(chunk)
            body = b"".join(parts)
        except UpstreamTimeout as exc:
            if not self.started:
                msg = f"upstream {m.upstream} stopped answering for {m.timeout_seconds:g} s"
                await self._error(send, 504, msg, {})
            else:  # mid-stream: the stream ends without its [DONE]
                await send({"type": "http.response.body", "body": b""})
            return exc
        except (UpstreamError, AnswerTooLarge) as exc:
            if not self.started:
                msg = f"upstream {m.upstream} failed: {exc}"
                await self._error(send, 502, msg, {})
            else:
                await send({"type": "http.response.body", "body": b""})
            return exc
        status = upstream.status
        if status == 200 and not upstream.header(b"content-encoding"):
            try:
                used = usage_tokens(orjson.loads(body).get("usage"))
            except (orjson.JSONDecodeError, AttributeError):
                used = None
            if used is not None:
                ctx.report(**used)
        head.append((b"content-length", str(len(body)).encode()))
        if status == 429:
            after = retry_after_of(
                upstream.header(b"retry-after"), float(gw.svc.settings.retry_after_seconds)
            )
            if not any(k.lower() == b"retry-after" for k, _ in head):
                head.append((b"retry-after", str(max(1, round(after))).encode()))
            await self._start(send, 429, head)
            await send({"type": "http.response.body", "body": body})
            seconds = min(after, gw.cfg.max_hold_seconds)
            if seconds > 0:
                gw.hold(ctx, seconds)  # releases the lease when the time is up
                return _Held()
            ctx.report(tokens=0)
            return UpstreamFailed("429")
        await self._start(send, status, head)
        await send({"type": "http.response.body", "body": body})
        return None if status < 400 else UpstreamFailed(str(status))


class _Held(Exception):
    """The lease is held back after an upstream 429; a task releases it later."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
