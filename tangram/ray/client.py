"""The Ray client: the broker's lease interface from any Ray driver, task or actor.

``async with client.lease(action) as lease:`` holds exact units for the body, like the
in-process ``Broker.lease``. ``await client.run(...)`` runs an action end to end on the
pooled executors (a sandbox command, a GPU service call, an HTTP call under a quota).

One client sustains many concurrent actions from one process cheaply: every
submission, release, heartbeat and cancellation goes into an outbox that one pump task
sends as a single ``exchange`` call, with at most one such call in flight (what piles up
meanwhile goes in the next one), and one long poll waits for grants while actions are
queued. Heartbeats are batched too: the keep-alive every door shares
(``tangram.leasing.KeepAlive``) renews every held lease a third of the shortest TTL
apart through ``heartbeat_many``, which puts them all in the next exchange; its reply
brings each lease's grant re-signed with its new expiry, which the client keeps on the
``Lease`` and hands to the executors.

When Ray restarts the broker actor, a call in flight fails with ``ActorUnavailableError``:
the client sends it again (for up to ``reconnect`` seconds) instead of failing its
callers, and once a reply says the actor is in a new life it submits every action it
still waits for again under the same id. A broker with a journal has restored those
actions (and the leases it had granted), so each waiter gets the restored action's grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from tangram.actions import Bound
from tangram.errors import WireError, class_named, from_name
from tangram.executors.api import HttpCall, HttpCaller
from tangram.executors.fencing import FencingError, SignedGrant, StaleLease
from tangram.executors.sandbox import Command
from tangram.executors.service import ServiceCall
from tangram.leasing import ABANDONED, Beats, KeepAlive, LeaseContext, waiting
from tangram.ray.actor import Reply
from tangram.ray.executors import executor_name
from tangram.spec import (
    Action,
    ActionCancelled,
    InvalidAction,
    Lease,
    LeaseExpired,
    LeaseReleased,
    TangramError,
    Unavailable,
)
from tangram.wire import lease_from_grant

DEFAULT_NAME = "tangram"
DEFAULT_NAMESPACE = "tangram"
POLL_WAIT = 2.0
RECONNECT = 60.0  # how long calls are sent again while the broker actor is restarting
RETRY_PAUSE = 0.2  # between two tries of a call that found the actor unavailable
RETRY_RELEASE = 0.5  # before a release the journal could not make durable is sent again
DUPES_KEPT = 10_000  # grants remembered to recognise one delivered twice

# A ``heartbeat_many`` call waiting for the exchange that carries its beats: the leases,
# when they were sent (on this process's monotonic clock), and its answer.
BeatWait = tuple[list[Lease], float, "asyncio.Future[Beats]"]


class ExecutorError(TangramError):
    """The executor running the action failed (its actor died); the units were returned."""


class BrokerNotFound(TangramError):
    """No broker actor under that name and namespace."""


def _unavailable(name: str | None) -> bool:
    # Done by the broker but not durable yet (its journal cannot write): ask again.
    return issubclass(class_named(name), Unavailable)


def _check_request(request: Any) -> None:
    # Bad input fails here, before the action waits in the queue.
    if not isinstance(request, (Command, ServiceCall, HttpCall)):
        raise InvalidAction(
            f"cannot run {type(request).__name__}: give a Command, ServiceCall or HttpCall"
        )
    if isinstance(request, (Command, HttpCall)):
        request.check()


def get_broker(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """The running broker actor's handle (``ray.init`` must have been called)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise BrokerNotFound(
            f"no Tangram broker named {name!r} in Ray namespace {namespace!r}; start one "
            "with tangram.ray.start_broker(config)"
        ) from None


class Client:
    """One per process (or per actor) is enough; it is bound to the event loop that
    first uses it. While the broker actor is unreachable (Ray restarting it) calls are
    sent again for up to ``reconnect`` seconds before what waits on them fails."""

    def __init__(
        self,
        broker: Any = None,
        *,
        name: str = DEFAULT_NAME,
        namespace: str = DEFAULT_NAMESPACE,
        reconnect: float = RECONNECT,
    ) -> None:
        self.broker = broker if broker is not None else get_broker(name, namespace)
        self.name = name
        self.namespace = namespace
        self.reconnect = reconnect
        self.id = f"c{uuid.uuid4().hex[:12]}"
        self._seq = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Lease]] = {}
        self._actions: dict[str, Action] = {}  # action id -> the action, while it waits
        self._releasing: dict[str, asyncio.Future[None]] = {}
        self._submits: list[Action] = []
        self._releases: list[tuple[str, str, dict[str, Any] | None]] = []
        self._beats: list[str] = []
        self._cancels: list[str] = []
        self._beat_waits: list[BeatWait] = []
        # Leases held by a body (``lease``, ``hold``, ``run``): heartbeats renew their
        # grants in place. ``_lost``: held leases that failed a heartbeat, and why.
        self._keep: KeepAlive[Lease] = KeepAlive(self.heartbeat_many)
        self._lost = self._keep.lost
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._polling = False
        self._pools: dict[str, dict[str, Any]] | None = None
        self._executors: dict[tuple[str, str, str], Any] = {}
        self._http: HttpCaller | None = None
        self._closed = False
        # Ray calls made to the broker, by kind: what the batching saves is visible here.
        self.calls: Counter[str] = Counter()
        # Surviving a restart of the broker actor:
        self._life: int | None = None  # the actor's life that answered last
        self._broken_since: float | None = None  # first failed call since the last reply
        self._resync = False  # a call failed: submit what waits again at the next reply
        self._resent: set[str] = set()  # actions submitted again, not yet granted
        # action id -> lease id of resent actions already granted: the same grant may
        # come once more (from the submission again) and must not be given back.
        self._dupes: dict[str, str] = {}
        self._release_args: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self._resent_releases: set[str] = set()
        self.restarts = 0  # new lives of the broker actor this client has seen

    # ------------------------------------------------------------------ leases
    async def acquire(self, action: Action, timeout: float | None = None) -> Lease:
        """Submit and wait for the grant; on timeout or cancellation the action leaves
        the queue and a grant that raced with it is given back."""
        if self._closed:
            raise TangramError("this client is closed")
        if not action.id:
            action.id = f"{self.id}-{next(self._seq)}"
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self._waiting[action.id] = fut
        self._actions[action.id] = action
        self._submits.append(action)
        self._kick()
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            self._actions.pop(action.id, None)
            self._resent.discard(action.id)
            if self._waiting.pop(action.id, None) is not None:
                self._cancels.append(action.id)
                self._kick()
            raise

    async def release(
        self, lease_id: str, outcome: str = "ok", usage: dict[str, Any] | None = None
    ) -> None:
        """Return the lease's units. Releasing twice is fine; LeaseExpired if it expired."""
        lost = self._keep.drop(lease_id)
        fut = self._releasing.get(lease_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._releasing[lease_id] = fut
            self._release_args[lease_id] = (outcome, usage)
            self._releases.append((lease_id, outcome, usage))
            self._kick()
        with contextlib.suppress(LeaseReleased):
            await asyncio.shield(fut)
        if lost is not None and isinstance(lost, LeaseExpired):
            raise lost

    def lease(self, action: Action, *, timeout: float | None = None) -> LeaseContext[Action, Lease]:
        """``async with client.lease(action) as lease:``, kept alive by batched heartbeats."""
        return LeaseContext(self, self._keep, action, timeout)

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive with the batched heartbeats until it is released."""
        self._keep.hold(lease)

    # ------------------------------------------------------------------ the door protocol
    async def release_lease(
        self, lease: Lease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        await self.release(lease.id, outcome, None if usage is None else dict(usage))

    async def heartbeat_many(self, leases: Sequence[Lease]) -> Beats:
        """Renew the leases in the next exchange (one Ray call, with whatever else is in
        the outbox) and wait for its reply: each lease gets its re-signed grant, and the
        answer says when it expires now (at the latest: sent + TTL, on this process's
        clock) or why it failed. A renewal the broker could not make durable yet is left
        out; the next beat sends it again."""
        if self._closed or not leases:
            return {}
        fut: asyncio.Future[Beats] = asyncio.get_running_loop().create_future()
        self._beats.extend(x.id for x in leases)
        self._beat_waits.append((list(leases), time.monotonic(), fut))
        self._kick()
        return await fut

    async def cancel_action(self, action_id: str) -> bool:
        """Take an action this client waits for out of the queue: its ``acquire`` raises
        ActionCancelled (a grant that raced the cancel is given back). False if this
        client does not wait for it."""
        fut = self._waiting.pop(action_id, None)
        if fut is None:
            return False
        self._actions.pop(action_id, None)
        self._resent.discard(action_id)
        self._cancels.append(action_id)
        self._kick()
        if not fut.done():
            fut.set_exception(ActionCancelled(f"action {action_id!r} was cancelled"))
        return True

    # ------------------------------------------------------------------ other calls
    async def close_trajectory(self, trajectory: str) -> int:
        """Close the trajectory (its pinned memory, queued actions, sandbox directory)."""
        return int(await self.broker.close_trajectory.remote(trajectory))

    async def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = await self.broker.snapshot.remote()
        return snap

    async def pools(self) -> dict[str, dict[str, Any]]:
        if self._pools is None:
            self._pools = await self.broker.describe.remote()
        return self._pools

    # ------------------------------------------------------------------ end to end
    async def run(
        self,
        work: Bound[Any] | Action,
        request: Any = None,
        *,
        trajectory: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Lease, run the request on its executor, release; return the executor's result.

        ``work`` is a ``Bound`` from an ``@tangram.action`` function (then give
        ``trajectory``) or an ``Action`` (then give ``request``): a ``Command``, a
        ``ServiceCall`` or an ``HttpCall``. A failure of the executor raises
        ``ExecutorError``; the units go back in every case."""
        if isinstance(work, Bound):
            if trajectory is None:
                raise InvalidAction("client.run(bound) needs trajectory=...")
            action, request = work.action(trajectory), work.request
        else:
            action = work
        _check_request(request)
        await self.pools()
        ctx = self.lease(action, timeout=timeout)
        async with ctx as lease:
            result, ctx.usage = await self._dispatch(lease, request)
        return result

    async def run_on(self, lease: Lease, request: Any) -> Any:
        """Run a request on the units of a lease you already hold (it stays held): for
        callers that lease once and run several commands, like a per-trajectory
        reservation. Token usage of an ``HttpCall`` is not reported this way."""
        _check_request(request)
        result, _ = await self._dispatch(lease, request)
        return result

    async def _dispatch(self, lease: Lease, request: Any) -> tuple[Any, dict[str, Any] | None]:
        pools = await self.pools()
        if isinstance(request, Command):
            return await self._run_command(lease, request, pools), None
        if isinstance(request, ServiceCall):
            return await self._run_service(lease, request, pools), None
        if self._http is None:
            self._http = HttpCaller()
        result = await self._http.call(request)
        return result, ({"tokens": result.tokens} if result.tokens is not None else None)

    def _pool_of(self, lease: Lease, kind: str, pools: dict[str, dict[str, Any]]) -> str:
        key = lease.action.key
        if key is not None and pools.get(key, {}).get("kind") == kind:
            return key
        for p in lease.allocation:
            if pools.get(p, {}).get("kind") == kind:
                return p
        raise InvalidAction(
            f"action {lease.action.id!r} demands no {kind} pool; demands: "
            + ", ".join(lease.allocation)
        )

    def _executor(self, kind: str, pool: str, node: str) -> Any:
        k = (kind, pool, node)
        handle = self._executors.get(k)
        if handle is None:
            name = executor_name(self.name, kind, pool, node)
            try:
                handle = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                raise ExecutorError(
                    f"no {kind} executor {name!r} for node {node!r} of pool {pool!r}; "
                    "start_broker(..., executors=True) starts them"
                ) from None
            self._executors[k] = handle
        return handle

    async def _call(self, lease: Lease, kind: str, pool: str, method: str, *args: Any) -> Any:
        node = lease.allocation[pool].node or ""
        handle = self._executor(kind, pool, node)
        try:
            return await getattr(handle, method).remote(*args)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            # The executor refused the grant (an expired or superseded lease, a missing or
            # forged grant, other units): say so plainly, not as a remote traceback.
            where = f" (lease {lease.id}, action {lease.action.id!r})"
            if isinstance(cause, StaleLease):
                raise StaleLease(f"{cause}{where}", cause.token, cause.newest) from None
            if isinstance(cause, FencingError):
                raise type(cause)(f"{cause}{where}") from None
            raise
        except RayActorError as exc:
            self._executors.pop((kind, pool, node), None)
            what = (
                "was unavailable (restarting) for"
                if isinstance(exc, ActorUnavailableError)
                else "died while running"
            )
            raise ExecutorError(
                f"the {kind} executor of node {node!r} (pool {pool!r}) {what} "
                f"action {lease.action.id!r} of trajectory {lease.action.trajectory!r}; "
                f"lease {lease.id} is released and its units returned ({type(exc).__name__})"
            ) from exc

    async def _run_command(
        self, lease: Lease, cmd: Command, pools: dict[str, dict[str, Any]]
    ) -> Any:
        pool = self._pool_of(lease, "cpu", pools)
        alloc = lease.allocation[pool]
        dop = alloc.amount if lease.action.key in (pool, None) else lease.dop
        return await self._call(
            lease,
            "sandbox",
            pool,
            "run",
            lease.action.trajectory,
            cmd,
            alloc.units,
            dop,
            lease.grant,
        )

    async def _run_service(
        self, lease: Lease, call: ServiceCall, pools: dict[str, dict[str, Any]]
    ) -> Any:
        service = lease.action.service
        if service is None:
            raise InvalidAction("a ServiceCall needs an action with service=...")
        pool = self._pool_of(lease, "gpu", pools)
        alloc = lease.allocation[pool]
        result = await self._call(
            lease,
            "service",
            pool,
            "run",
            service,
            alloc.units,
            alloc.evicts,
            call.payload,
            lease.grant,
        )
        if result.restored:
            # The measured copy time corrects the pool's restore cost (fire and forget).
            self.broker.observe_restore.remote(pool, service, result.restore_seconds)
        return result

    # ------------------------------------------------------------------ the pump
    def _kick(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
            self._spawn(self._pump())
        self._wake.set()

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)
        return task

    async def _pump(self) -> None:
        assert self._wake is not None
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if self._submits or self._releases or self._beats or self._cancels:
                batch = (self._submits, self._releases, self._beats, self._cancels)
                self._submits, self._releases, self._beats, self._cancels = [], [], [], []
                waits, self._beat_waits = self._beat_waits, []
                try:
                    self.calls["exchange"] += 1
                    reply = await self.broker.exchange.remote(self.id, *batch, 0.0)
                except asyncio.CancelledError:
                    _answer_beats(waits, None)
                    raise
                except Exception as exc:
                    if await self._survivable(exc):
                        self._requeue(batch)
                        self._beat_waits[:0] = waits
                        await asyncio.sleep(RETRY_PAUSE)
                        self._wake.set()
                        continue
                    self._fail_all(batch, exc)  # the broker is gone: fail what waited
                    _answer_beats(waits, None)
                    continue
                self._handle(reply)
                _answer_beats(waits, reply)
            if self._waiting and not self._polling:
                self._polling = True
                self._spawn(self._poll())

    async def _poll(self) -> None:
        # While actions wait, one call at a time sits in the broker until grants come.
        try:
            while self._waiting and not self._closed:
                self.calls["poll"] += 1
                # Just after a failed call, a short answer: it says whether the actor was
                # restarted, and the client then submits again what it waits for.
                wait = 0.0 if self._resync else POLL_WAIT
                try:
                    reply = await self.broker.exchange.remote(
                        self.id, [], [], [], [], wait, self._life
                    )
                except Exception as exc:
                    if await self._survivable(exc):
                        await asyncio.sleep(RETRY_PAUSE)
                        continue
                    raise
                self._handle(reply)
        except Exception as exc:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(TangramError(f"lost the broker: {exc}"))
            self._waiting.clear()
            self._actions.clear()
        finally:
            self._polling = False

    def _handle(self, reply: Reply) -> None:
        grants, released, failed, refreshed, life = reply
        self._broken_since = None
        restarted = self._life is not None and life != self._life
        self._life = life
        for action_id, wire, err, msg in grants:
            fut = self._waiting.pop(action_id, None)
            action = self._actions.pop(action_id, None)
            resent = action_id in self._resent
            self._resent.discard(action_id)
            grant_id = None if wire is None else wire.get("id")
            if wire is not None and self._dupes.get(action_id) == grant_id:
                del self._dupes[action_id]  # the second delivery of a grant already given
                continue
            if grant_id is not None and resent and fut is not None and not fut.done():
                self._dupes[action_id] = grant_id
                if len(self._dupes) > DUPES_KEPT:
                    del self._dupes[next(iter(self._dupes))]
            if fut is None or not waiting(fut) or action is None:
                if grant_id is not None:
                    # Its caller gave up (timeout, cancellation): give the grant back.
                    self._abandon_grant(grant_id)
                continue
            if wire is not None:
                try:
                    # Times on this process's monotonic clock (the broker's is not ours);
                    # the action's key is the broker's, which may have inferred it.
                    lease = lease_from_grant(wire, action, time.monotonic())
                except WireError as exc:  # a broker of another version: nobody holds it
                    if grant_id is not None:
                        self._abandon_grant(grant_id)
                    fut.set_exception(exc)
                    continue
                fut.set_result(lease)
            else:
                fut.set_exception(from_name(err, msg))
        for lease_id, err, msg in released:
            resent = lease_id in self._resent_releases
            self._resent_releases.discard(lease_id)
            if _unavailable(err) and lease_id in self._release_args:
                # Done, but not durable yet: ask again until the journal has it.
                asyncio.get_running_loop().call_later(RETRY_RELEASE, self._resend_release, lease_id)
                continue
            self._release_args.pop(lease_id, None)
            rfut = self._releasing.pop(lease_id, None)
            if rfut is not None and not rfut.done():
                if err is None or (resent and err == "UnknownLease"):
                    # A release sent again after a failed call that the broker had
                    # already applied (or a broker without a journal that forgot the
                    # lease): either way it is gone and its units are free.
                    rfut.set_result(None)
                else:
                    rfut.set_exception(from_name(err, msg))
                    rfut.exception()  # retrieved: an abandoned release may have no reader
        for lease_id, err, msg in failed:
            if _unavailable(err):
                continue  # renewed but not durable yet: the next heartbeat tries again
            self._keep.lose(lease_id, from_name(err, msg))
        held = self._keep.held
        for lease_id, grant in refreshed:
            kept = held.get(lease_id)
            if kept is not None:
                _renew(kept, grant)
        if restarted:
            self.restarts += 1
        if restarted or self._resync:
            self._resync = False
            self._resubmit()

    def _fail_all(self, batch: tuple[list[Any], ...], exc: BaseException) -> None:
        submits, releases, _, _ = batch
        error = TangramError(f"the broker call failed: {exc}")
        for action in submits:
            self._actions.pop(action.id, None)
            fut = self._waiting.pop(action.id, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)
        for lease_id, _, _ in releases:
            self._release_args.pop(lease_id, None)
            rfut = self._releasing.pop(lease_id, None)
            if rfut is not None and not rfut.done():
                rfut.set_exception(error)
                rfut.exception()

    async def _survivable(self, exc: BaseException) -> bool:
        """Whether a failed broker call is worth sending again: the actor is restarting
        (Ray answers calls in flight with ``ActorUnavailableError``) and has not been
        unreachable for longer than ``reconnect`` seconds."""
        if self._closed or not isinstance(exc, RayActorError):
            return False
        now = time.monotonic()
        if self._broken_since is None:
            self._broken_since = now
        elif now - self._broken_since > self.reconnect:
            return False
        if not isinstance(exc, ActorUnavailableError):
            # ActorDiedError: dead for good (killed, out of restarts), unless its name
            # still resolves, which it does while Ray restarts it.
            try:
                ray.get_actor(self.name, namespace=self.namespace)
            except ValueError:
                return False
        self._resync = True
        return True

    def _requeue(self, batch: tuple[list[Any], ...]) -> None:
        """Put a failed call's batch back in the outbox. The broker may have applied
        it before it died: submissions attach to what it restored, a release it
        already made answers UnknownLease, heartbeats are harmless twice."""
        submits, releases, beats, cancels = batch
        self._submits[:0] = [a for a in submits if a.id in self._waiting]
        self._releases[:0] = releases
        self._resent_releases.update(lease_id for lease_id, _, _ in releases)
        self._beats[:0] = [i for i in beats if i in self._keep.held]
        self._cancels[:0] = cancels

    def _resubmit(self) -> None:
        """Submit every action still waited for again (same ids): after a restart the
        broker has them from its journal and the submission attaches to them; after a
        failed call whose reply may have carried a grant, it delivers that grant again."""
        outbox = {a.id for a in self._submits}
        for action_id, fut in self._waiting.items():
            action = self._actions.get(action_id)
            if fut.done() or action is None:
                continue
            self._resent.add(action_id)
            if action_id not in outbox:
                self._submits.append(action)
        # Restored leases kept counting down while the actor was away: renew them now.
        self._beats = list(dict.fromkeys([*self._beats, *self._keep.held]))
        self._kick()

    def _abandon_grant(self, lease_id: str) -> None:
        """Give back a grant nobody will hold (its caller gave up)."""
        self._releases.append((lease_id, ABANDONED, None))
        self._release_args[lease_id] = (ABANDONED, None)
        self._releasing[lease_id] = asyncio.get_running_loop().create_future()
        self._kick()

    def _resend_release(self, lease_id: str) -> None:
        args = self._release_args.get(lease_id)
        if args is None or self._closed:
            return
        self._releases.append((lease_id, *args))
        self._kick()

    async def aclose(self) -> None:
        """Stop the pump; grants the broker holds for this client go back."""
        if self._closed:
            return
        self._closed = True
        self._keep.close()
        if self._wake is not None:
            self._wake.set()
        for task in list(self._tasks):
            task.cancel()  # a call already sent still runs in the broker
        waits, self._beat_waits = self._beat_waits, []
        _answer_beats(waits, None)
        # Queued actions leave the queue; releases not sent yet go out now, not at TTL.
        cancels = self._cancels + list(self._waiting)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ActionCancelled("the client was closed"))
        self._waiting.clear()
        self._actions.clear()
        with contextlib.suppress(Exception):
            if self._releases or cancels:
                await self.broker.exchange.remote(self.id, [], self._releases, [], cancels, 0.0)
            await self.broker.goodbye.remote(self.id)
        self._releases, self._cancels, self._submits = [], [], []
        if self._http is not None:
            await self._http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _renew(lease: Lease, grant: SignedGrant) -> None:
    # Replies may come out of order after a resend: keep the newest grant.
    if lease.grant is None or grant.expires > lease.grant.expires:
        lease.grant = grant


def _answer_beats(waits: list[BeatWait], reply: Reply | None) -> None:
    """Answer ``heartbeat_many`` calls from the reply of the exchange that carried their
    beats (None: no reply will come; nothing is known, the leases stay held)."""
    if not waits:
        return
    failed: dict[str, TangramError | None] = {}
    grants: dict[str, SignedGrant] = {}
    if reply is not None:
        for lease_id, err, msg in reply[2]:
            # Not durable yet: no answer, the next beat sends it again.
            failed[lease_id] = None if _unavailable(err) else from_name(err, msg)
        grants = dict(reply[3])
    for leases, sent, fut in waits:
        out: Beats = {}
        if reply is not None:
            for lease in leases:
                if lease.id in failed:
                    error = failed[lease.id]
                    if error is not None:
                        out[lease.id] = error
                    continue
                grant = grants.get(lease.id)
                if grant is not None:
                    _renew(lease, grant)
                out[lease.id] = sent + lease.ttl
        if not fut.done():
            fut.set_result(out)
