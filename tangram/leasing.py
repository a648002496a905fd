"""What every door onto the broker shares: the client protocol, one lease context, one
keep-alive, and the clock they count in.

Three doors lead to the broker: in-process (``tangram.broker.Broker``), HTTP
(``tangram.client.HttpClient``, and ``SyncHttpClient`` on top of it) and Ray
(``tangram.ray.Client``). Each implements ``Door``: acquire an action within a timeout,
release a lease with an outcome and usage, heartbeat many leases in one call, cancel a
queued action. ``LeaseContext`` (``async with door.lease(action) as lease:``) and
``KeepAlive`` (one task per door heartbeating every lease its contexts hold) are built on
those calls only, so the three doors behave alike: the lease is released on exit, with
``outcome="error"`` when the body raised (and then the body's exception wins over a
failed release), and held leases are renewed a third of the shortest TTL apart.

This module sits low (it imports only the errors): the doors above it import it, never
the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from tangram.errors import TangramError

# The outcome of a grant nobody will hold: its caller gave up (a timeout or cancellation
# raced the grant) or went away. Where the door's wire allows no such outcome (the HTTP
# API knows ok and error), it gives the grant back as an error.
ABANDONED = "abandoned"


class Held(Protocol):
    """What a door's lease shows the keep-alive."""

    @property
    def id(self) -> str: ...

    @property
    def ttl(self) -> float: ...


T = TypeVar("T")
A = TypeVar("A")
A_contra = TypeVar("A_contra", contravariant=True)
L = TypeVar("L", bound=Held)

# What ``heartbeat_many`` answers: lease id -> its new expiry (on the door's clock) or
# the error that ended it. A lease left out got no answer this time (the server was
# unreachable, the renewal is not durable yet): the next beat tries it again.
Beats = dict[str, float | TangramError]


@runtime_checkable
class Door(Protocol[A_contra, L]):
    """The calls every door implements; ``LeaseContext`` and ``KeepAlive`` need no more."""

    async def acquire(self, action: A_contra, timeout: float | None = None) -> L:
        """Submit and wait for the grant (``TimeoutError`` after ``timeout`` s). On
        timeout or cancellation the action leaves the queue, and a grant that raced with
        it is given back."""
        ...

    async def release_lease(
        self, lease: L, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        """Return the lease's units (idempotent); ``LeaseExpired`` if it lapsed first."""
        ...

    async def heartbeat_many(self, leases: Sequence[L]) -> Beats:
        """Renew every lease given, in as few calls to the broker as the door can."""
        ...

    async def cancel_action(self, action_id: str) -> bool:
        """Take a queued action out of the queue (its waiter gets ``ActionCancelled``);
        False if it was not queued."""
        ...


def loop_time() -> float:
    """The running event loop's clock, the one its timers (``call_later``) count in: the
    live broker's time, so that a test loop that fast-forwards time moves the broker's
    deadlines and timers together. Outside a loop, ``time.monotonic``, which asyncio's
    own loops read too."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


# ---------------------------------------------------------------------- grants that raced
def waiting(fut: asyncio.Future[Any] | None) -> bool:
    """Whether a caller still waits on ``fut`` for its grant. A grant that finds nobody
    (the caller timed out, was cancelled, or went away between two rounds) raced its
    cancel: the door must give it back (``ABANDONED``), or its units stay held until
    the TTL."""
    return fut is not None and not fut.done()


def hand_over(fut: asyncio.Future[T] | None, lease: T) -> bool:
    """Resolve the waiter with its grant; False when nobody waits (see ``waiting``)."""
    if fut is None or fut.done():
        return False
    fut.set_result(lease)
    return True


def raced(fut: asyncio.Future[T]) -> T | None:
    """The grant a caller's future got just before the caller gave up (the grant won the
    race with the timeout or cancellation): nobody will hold it, so it goes back."""
    if fut.done() and not fut.cancelled() and fut.exception() is None:
        return fut.result()
    return None


async def finish(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if cancelled meanwhile, then raise the cancellation.
    A release that is cut off would leave the units held until the TTL."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
        except Exception:
            pass  # the task's own error: raised below, or dropped for the cancellation
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the cancellation is what the caller hears
        raise asyncio.CancelledError
    return task.result()


# ---------------------------------------------------------------------- the keep-alive
def _wake(nap: asyncio.Future[bool], early: bool) -> None:
    if not nap.done():
        nap.set_result(early)


class KeepAlive(Generic[L]):
    """One task per door renews every held lease, a third of the shortest TTL apart, in
    one ``heartbeat_many`` call: never a timer or a call per lease. A lease with a
    shorter TTL than the sleeping task planned for wakes it: the next beat comes no later
    than that TTL's third from now, nor later than it was due. A lease whose heartbeat
    fails is dropped, and the error kept in ``lost`` until the door releases it
    (``drop``)."""

    __slots__ = ("_beat", "_least", "_nap", "_period", "_task", "held", "lost")

    def __init__(self, beat: Callable[[list[L]], Awaitable[Beats]], *, least: float = 0.0) -> None:
        self._beat = beat
        self._least = least  # the shortest period, however short a TTL
        self.held: dict[str, L] = {}
        self.lost: dict[str, TangramError] = {}
        self._task: asyncio.Task[None] | None = None
        self._period = math.inf  # what the sleeping task sleeps
        self._nap: asyncio.Future[bool] | None = None

    def hold(self, lease: L) -> None:
        """Keep ``lease`` alive until ``drop`` (or until a heartbeat fails)."""
        self.held[lease.id] = lease
        task = self._task
        if task is None or task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif lease.ttl / 3 < self._period:
            nap = self._nap
            if nap is not None and not nap.done():
                nap.set_result(True)

    def drop(self, lease_id: str) -> TangramError | None:
        """Stop keeping the lease alive (it is being released); the error a heartbeat
        met meanwhile, if one did."""
        self.held.pop(lease_id, None)
        return self.lost.pop(lease_id, None) if self.lost else None

    def lose(self, lease_id: str, error: TangramError) -> None:
        """A heartbeat failed: stop renewing the lease and keep the error for ``drop``."""
        if self.held.pop(lease_id, None) is not None:
            self.lost[lease_id] = error

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._period = math.inf

    def _gap(self) -> float:
        return max(min(x.ttl for x in self.held.values()) / 3, self._least)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held = self.held
        if not held:  # released before this task first ran
            return
        self._period = self._gap()
        due = loop.time() + self._period
        while held:
            nap = self._nap = loop.create_future()
            timer = loop.call_at(due, _wake, nap, False)
            try:
                early = await nap
            finally:
                timer.cancel()
                self._nap = None
            if early:
                if held:
                    self._period = self._gap()
                    due = min(due, loop.time() + self._period)
                continue
            if held:
                for lease_id, result in (await self._beat(list(held.values()))).items():
                    if isinstance(result, TangramError):
                        self.lose(lease_id, result)
            if held:
                self._period = self._gap()
                due = loop.time() + self._period
        self._period = math.inf


# ---------------------------------------------------------------------- the lease context
class LeaseContext(Generic[A, L]):
    """``async with door.lease(action) as lease:``: acquire, keep alive while the body
    runs, release on exit (``"ok"``, or ``"error"`` when the body raised or was
    cancelled). After a normal exit, a release that fails (a lease that expired
    meanwhile: ``LeaseExpired``) raises; after an exception, the body's exception wins.
    What the body used goes with the release, also after an exception (the tokens were
    spent): ``ctx.report(tokens=n)`` inside the body, or ``ctx.usage = {"tokens": n}``.
    A tokens-per-minute quota pool then charges what was used, not the estimate::

        ctx = door.lease(action)
        async with ctx as lease:
            reply = await call_the_model(lease)
            ctx.report(tokens=reply.total_tokens)

    A plain class, not a generator-based context manager: it runs on every action."""

    __slots__ = ("_action", "_door", "_keep", "_lease", "_timeout", "usage")

    def __init__(
        self, door: Door[A, L], keep: KeepAlive[L], action: A, timeout: float | None
    ) -> None:
        self._door = door
        self._keep = keep
        self._action = action
        self._timeout = timeout
        self._lease: L | None = None
        self.usage: Mapping[str, Any] | None = None

    def report(self, tokens: int | None = None, **usage: Any) -> None:
        """Record what the body used, for the release at exit: ``tokens`` corrects a
        tokens-per-minute pool's estimate; other numbers go along (the broker ignores
        what it does not know). A later report of the same key replaces the earlier."""
        merged = dict(self.usage or {})
        if tokens is not None:
            merged["tokens"] = int(tokens)
        merged.update(usage)
        self.usage = merged

    async def __aenter__(self) -> L:
        lease = await self._door.acquire(self._action, self._timeout)
        self._lease = lease
        self._keep.hold(lease)
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease = self._lease
        assert lease is not None
        if exc_type is None:
            await self._door.release_lease(lease, "ok", self.usage)
            return
        with contextlib.suppress(Exception):
            await self._door.release_lease(lease, "error", self.usage)


class SyncLeaseContext(Generic[A, L]):
    """``with client.lease(action) as lease:`` for the blocking clients: a
    ``LeaseContext`` run on the client's event loop (in its own thread) by ``run``,
    which blocks until a coroutine is done there. ``report`` as on ``LeaseContext``."""

    __slots__ = ("_ctx", "_run")

    def __init__(
        self, ctx: LeaseContext[A, L], run: Callable[[Coroutine[Any, Any, Any]], Any]
    ) -> None:
        self._ctx = ctx
        self._run = run

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self._ctx.usage

    @usage.setter
    def usage(self, usage: Mapping[str, Any] | None) -> None:
        self._ctx.usage = usage

    def report(self, tokens: int | None = None, **usage: Any) -> None:
        self._ctx.report(tokens, **usage)

    def __enter__(self) -> L:
        lease: L = self._run(self._ctx.__aenter__())
        return lease

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run(self._ctx.__aexit__(exc_type, exc, tb))
