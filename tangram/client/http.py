"""``HttpClient``: the lease API from asyncio code, with httpx.

``async with client.lease(action) as lease:`` submits with an idempotency key, long-polls
until granted, heartbeats in the background while the body runs and releases on exit,
also on error or cancellation (the lease context and keep-alive every door shares,
``tangram.leasing``). Transient connection errors are retried, with jittered exponential
backoff; every call is safe to repeat (submits carry an idempotency key, release is
idempotent). When the retries run out, ``BrokerUnreachable`` names the URL and the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from tangram.client.errors import HttpError, TooManyQueued, Unauthorized, raise_for
from tangram.client.wire import RemoteLease, action_json
from tangram.errors import BrokerUnreachable
from tangram.leasing import Beats, KeepAlive, LeaseContext, finish
from tangram.spec import (
    Action,
    ActionCancelled,
    InvalidAction,
    TangramError,
    UnknownAction,
)

# Errors after which the request may not have been answered; all calls may be repeated.
TRANSIENT: tuple[type[Exception], ...] = (httpx.TransportError,)
RETRY_STATUS = frozenset({502, 503, 504})

ActionLike = Action | Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ActionState:
    """An action as the server sees it: queued, granted, released, expired or cancelled."""

    id: str
    state: str
    trajectory: str
    lease: RemoteLease | None

    @staticmethod
    def from_json(raw: Mapping[str, Any]) -> ActionState:
        lease = raw.get("lease")
        return ActionState(
            id=raw["id"],
            state=raw["state"],
            trajectory=raw.get("trajectory", ""),
            lease=RemoteLease.from_json(raw["id"], lease) if lease else None,
        )


class HttpClient:
    """A client of ``tangram serve``. Use as ``async with HttpClient(url) as client:``."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 10.0,
        poll: float = 20.0,
        retries: int = 4,
        backoff: float = 0.05,
        max_backoff: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.timeout = timeout
        self.poll = poll  # longest single long poll; the server may cap it lower
        self.retries = retries
        self.backoff = backoff
        # Capped: a lease must not lapse while its release waits out a long backoff.
        self.max_backoff = max_backoff
        # Leases held by ``lease`` contexts; no beat more often than every 10 ms.
        self._keep: KeepAlive[RemoteLease] = KeepAlive(self.heartbeat_many, least=0.01)

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._keep.close()
        await self._http.aclose()

    # ------------------------------------------------------------------ one call each
    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        wait: float = 0.0,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        params = {"wait": f"{wait:.3f}"} if wait > 0 else None
        delay = self.backoff
        started = time.monotonic()
        for attempt in range(self.retries + 1):
            # Jittered (half to all of the delay), so that thousands of workers that
            # failed together do not retry in lockstep.
            pause = delay * (0.5 + random.random() / 2)
            delay = min(delay * 2, self.max_backoff)
            last = attempt == self.retries
            try:
                r = await self._http.request(
                    method,
                    path,
                    json=body,
                    params=params,
                    headers=headers,
                    timeout=self.timeout + wait,
                )
            except TRANSIENT as exc:
                if last:
                    raise self._unreachable(method, path, exc, started) from exc
                await asyncio.sleep(pause)
                continue
            if r.status_code in RETRY_STATUS and not last:
                if r.status_code == 503:  # the server says when (a full journal disk)
                    pause = max(pause, min(_retry_after(r), self.max_backoff))
                await asyncio.sleep(pause)
                continue
            data = _json(r)
            if r.status_code >= 400:
                raise_for(r.status_code, data, _retry_after(r), url=f"{method} {r.url}")
            return r.status_code, data
        raise AssertionError("unreachable")

    def _unreachable(
        self, method: str, path: str, exc: Exception, started: float
    ) -> BrokerUnreachable:
        """The error for a call no answer came back to: where, why, how hard we tried."""
        url = str(self._http.base_url).rstrip("/") + path
        if isinstance(exc, httpx.RequestError):
            with contextlib.suppress(RuntimeError):  # raised before a request was built
                url = str(exc.request.url)
        why = str(exc) or "no detail"
        tries = self.retries + 1
        return BrokerUnreachable(
            f"no answer from the Tangram broker at {method} {url}: {type(exc).__name__}: "
            f"{why} ({tries} tries in {time.monotonic() - started:.1f} s; is `tangram "
            "serve` running there?)",
            url=url,
        )

    async def submit(
        self, action: ActionLike, *, wait: float = 0.0, idempotency_key: str | None = None
    ) -> ActionState:
        """Queue an action; with ``wait``, hold until granted or ``wait`` s pass."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        _, data = await self._call(
            "POST", "/v1/actions", body=action_json(action), wait=wait, headers=headers
        )
        return ActionState.from_json(data)

    async def get(self, action_id: str, *, wait: float = 0.0) -> ActionState:
        _, data = await self._call("GET", f"/v1/actions/{segment(action_id)}", wait=wait)
        return ActionState.from_json(data)

    async def cancel(self, action_id: str) -> ActionState:
        """Cancel a queued action (HttpError 409 once it is granted)."""
        _, data = await self._call("DELETE", f"/v1/actions/{segment(action_id)}")
        return ActionState.from_json(data)

    async def heartbeat(
        self, lease_id: str, ttl: float | None = None, *, fencing_token: int | None = None
    ) -> float:
        """Extend the lease; returns its new expiry (Unix time). LeaseExpired once lapsed.
        ``fencing_token`` (the lease's): refused unless it is the lease's own."""
        body = _holder({"ttl": ttl} if ttl is not None else {}, fencing_token)
        path = f"/v1/leases/{segment(lease_id)}/heartbeat"
        _, data = await self._call("POST", path, body=body or None)
        return float(data["expires_at"])

    async def release(
        self,
        lease_id: str,
        outcome: str = "ok",
        usage: Mapping[str, Any] | None = None,
        *,
        fencing_token: int | None = None,
    ) -> None:
        """Return the lease's units (idempotent); LeaseExpired if it lapsed first.
        ``fencing_token`` (the lease's): refused unless it is the lease's own."""
        self._keep.drop(lease_id)
        body: dict[str, Any] = _holder({"outcome": outcome}, fencing_token)
        if usage is not None:
            body["usage"] = dict(usage)
        await self._call("POST", f"/v1/leases/{segment(lease_id)}/release", body=body)

    async def close_trajectory(self, trajectory: str) -> int:
        """Close a trajectory (any id: it is percent-encoded)."""
        _, data = await self._call("POST", f"/v1/trajectories/{segment(trajectory)}/close")
        return int(data["cancelled"])

    async def pools(self) -> dict[str, Any]:
        _, data = await self._call("GET", "/v1/pools")
        return dict(data)

    async def status(self) -> dict[str, Any]:
        """``pools()`` and the queue per tenant, the oldest waiters and why they wait,
        the leases by age (``GET /v1/status``, what ``tangram status`` shows)."""
        _, data = await self._call("GET", "/v1/status")
        return dict(data)

    # ------------------------------------------------------------------ leases
    async def acquire(
        self,
        action: ActionLike,
        timeout: float | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> RemoteLease:
        """Submit and long-poll until granted. On timeout (TimeoutError), cancellation
        or error the action is cancelled, and a grant that raced with it released."""
        loop = asyncio.get_running_loop()
        key = idempotency_key or uuid.uuid4().hex
        deadline = None if timeout is None else loop.time() + timeout
        state: ActionState | None = None
        try:
            while True:
                left = self.poll if deadline is None else max(0.0, deadline - loop.time())
                wait = min(self.poll, left)
                try:
                    if state is None:
                        state = await self.submit(action, wait=wait, idempotency_key=key)
                    else:
                        try:
                            state = await self.get(state.id, wait=wait)
                        except UnknownAction:
                            # The server restarted and its queue was lost (granted
                            # leases survive, queued actions need not): submit again
                            # under the same key, which never makes a second action.
                            state = None
                            continue
                except TooManyQueued as exc:
                    if deadline is not None and loop.time() + exc.retry_after > deadline:
                        raise TimeoutError(f"server busy: {exc.detail}") from exc
                    await asyncio.sleep(exc.retry_after)
                    continue
                if state.state == "granted" and state.lease is not None:
                    return state.lease
                if state.state != "queued":
                    raise ActionCancelled(f"action {state.id} is {state.state}, not granted")
                if deadline is not None and loop.time() >= deadline:
                    raise TimeoutError(f"action {state.id} was not granted in {timeout} s")
        except BaseException as exc:
            if isinstance(exc, (InvalidAction, Unauthorized)):
                raise  # refused: nothing was queued
            # The server may hold a queued action (or a grant) nobody will use.
            await finish(self._abandon(action, key, state))
            raise

    async def _abandon(self, action: ActionLike, key: str, state: ActionState | None) -> None:
        with contextlib.suppress(TangramError, httpx.HTTPError):
            if state is None:
                # The submit may have reached the server: ask with the same key, which
                # never creates a second action (it may create the first; then it goes).
                state = await self.submit(action, idempotency_key=key)
            if state.state == "queued":
                try:
                    state = await self.cancel(state.id)
                except HttpError as exc:
                    if exc.status != 409:
                        raise
                    state = await self.get(state.id)  # granted meanwhile
            if state.state == "granted" and state.lease is not None:
                # The grant raced the cancel: give it back (the API knows no
                # "abandoned" outcome, so as an error).
                lease = state.lease
                await self.release(lease.id, "error", fencing_token=lease.fencing_token)

    def lease(
        self, action: ActionLike, *, timeout: float | None = None
    ) -> LeaseContext[ActionLike, RemoteLease]:
        """``async with client.lease(action) as lease:`` holds the units for the body."""
        return LeaseContext(self, self._keep, action, timeout)

    # ------------------------------------------------------------------ the door protocol
    async def release_lease(
        self, lease: RemoteLease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        """``release`` with the lease's fencing token, carried through to the end even if
        the caller is cancelled meanwhile."""
        await finish(self.release(lease.id, outcome, usage, fencing_token=lease.fencing_token))

    async def heartbeat_many(self, leases: Sequence[RemoteLease]) -> Beats:
        """One heartbeat request per lease (the API has no batch), all at once, each with
        the lease's fencing token. A lease the server could not be asked about is left
        out: the next beat may get through."""

        async def one(lease: RemoteLease) -> float | TangramError | None:
            try:
                return await self.heartbeat(lease.id, fencing_token=lease.fencing_token)
            except (BrokerUnreachable, httpx.HTTPError):
                return None  # not asked: the next beat may get through
            except TangramError as exc:  # expired, released or forgotten
                return exc

        answers = await asyncio.gather(*(one(x) for x in leases))
        return {x.id: a for x, a in zip(leases, answers, strict=True) if a is not None}

    async def cancel_action(self, action_id: str) -> bool:
        """``cancel``, as every door has it: False when the action is not queued."""
        try:
            state = await self.cancel(action_id)
        except UnknownAction:
            return False
        except HttpError as exc:
            if exc.status != 409:  # granted already
                raise
            return False
        return state.state == "cancelled"


def segment(value: str) -> str:
    """``value`` as one path segment: every reserved character percent-encoded, and
    dots too (a client library would otherwise resolve ``..`` as a dot-segment)."""
    return quote(value, safe="").replace(".", "%2E")


def _holder(body: dict[str, Any], fencing_token: int | None) -> dict[str, Any]:
    if fencing_token is not None:
        body["fencing_token"] = fencing_token
    return body


def _json(r: httpx.Response) -> Any:
    """The body as JSON; a proxy's HTML error page becomes a problem with its text."""
    if not r.content:
        return {}
    try:
        return r.json()
    except ValueError:
        return {"detail": r.text[:500]}


def _retry_after(r: httpx.Response) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0
