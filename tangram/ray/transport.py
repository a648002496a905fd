"""The Ray client's transport: one outbox sent to the broker actor as one ``exchange``
call at a time (what piles up meanwhile goes in the next), one long poll while actions
wait, and each reply matched back to the futures waiting on it. A call that fails while
Ray restarts the actor is sent again (for up to ``reconnect`` seconds); once a reply
comes from a new life of the actor, every action still waited for is submitted again
under its id, which attaches it to what a broker with a journal restored (docs/ray.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from tangram.errors import WireError, class_named, from_name
from tangram.executors.fencing import SignedGrant
from tangram.leasing import ABANDONED, Beats, KeepAlive, waiting
from tangram.ray.actor import Reply
from tangram.spec import Action, ActionCancelled, Lease, TangramError, Unavailable
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


class BrokerNotFound(TangramError):
    """No broker actor under that name and namespace."""


def get_broker(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> Any:
    """The running broker actor's handle (``ray.init`` must have been called)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise BrokerNotFound(
            f"no Tangram broker named {name!r} in Ray namespace {namespace!r}; start one "
            "with tangram.ray.start_broker(config)"
        ) from None


def _unavailable(name: str | None) -> bool:
    # Done by the broker but not durable yet (its journal cannot write): ask again.
    return issubclass(class_named(name), Unavailable)


class Transport:
    """The outbox and the calls to the broker actor of one client (``client_id``),
    bound to the event loop that first uses it. ``keep`` is the client's keep-alive:
    replies renew its leases' grants and drop the leases whose heartbeat failed."""

    def __init__(
        self,
        broker: Any,
        client_id: str,
        keep: KeepAlive[Lease],
        *,
        name: str,
        namespace: str,
        reconnect: float,
    ) -> None:
        self.broker = broker
        self.id = client_id
        self.name = name
        self.namespace = namespace
        self.reconnect = reconnect
        self.closed = False
        self._keep = keep
        self.waiting: dict[str, asyncio.Future[Lease]] = {}
        self._actions: dict[str, Action] = {}  # action id -> the action, while it waits
        self._releasing: dict[str, asyncio.Future[None]] = {}
        self._submits: list[Action] = []
        self._releases: list[tuple[str, str, dict[str, Any] | None]] = []
        self._beats: list[str] = []
        self._cancels: list[str] = []
        self._beat_waits: list[BeatWait] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._polling = False
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

    # ------------------------------------------------------------------ the outbox
    def submit(self, action: Action) -> asyncio.Future[Lease]:
        """Submit in the next exchange; the future gets the grant or the refusal."""
        fut: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        self.waiting[action.id] = fut
        self._actions[action.id] = action
        self._submits.append(action)
        self._kick()
        return fut

    def withdraw(self, action_id: str) -> None:
        """Stop waiting for the action; if it was waited for, cancel it at the broker (a
        grant that raced the cancel is given back when it comes)."""
        self._actions.pop(action_id, None)
        self._resent.discard(action_id)
        if self.waiting.pop(action_id, None) is not None:
            self._cancels.append(action_id)
            self._kick()

    def release(
        self, lease_id: str, outcome: str, usage: dict[str, Any] | None
    ) -> asyncio.Future[None]:
        """Release in the next exchange, once however often asked; the future says how
        it went (LeaseReleased: released before)."""
        fut = self._releasing.get(lease_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._releasing[lease_id] = fut
            self._release_args[lease_id] = (outcome, usage)
            self._releases.append((lease_id, outcome, usage))
            self._kick()
        return fut

    async def heartbeat_many(self, leases: Sequence[Lease]) -> Beats:
        """Renew the leases in the next exchange and answer from its reply."""
        if self.closed or not leases:
            return {}
        fut: asyncio.Future[Beats] = asyncio.get_running_loop().create_future()
        self._beats.extend(x.id for x in leases)
        self._beat_waits.append((list(leases), time.monotonic(), fut))
        self._kick()
        return await fut

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
        while not self.closed:
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
            if self.waiting and not self._polling:
                self._polling = True
                self._spawn(self._poll())

    async def _poll(self) -> None:
        # While actions wait, one call at a time sits in the broker until grants come.
        try:
            while self.waiting and not self.closed:
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
            for fut in self.waiting.values():
                if not fut.done():
                    fut.set_exception(TangramError(f"lost the broker: {exc}"))
            self.waiting.clear()
            self._actions.clear()
        finally:
            self._polling = False

    # ------------------------------------------------------------------ replies
    def _handle(self, reply: Reply) -> None:
        grants, released, failed, refreshed, life = reply
        self._broken_since = None
        restarted = self._life is not None and life != self._life
        self._life = life
        for action_id, wire, err, msg in grants:
            fut = self.waiting.pop(action_id, None)
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
            fut = self.waiting.pop(action.id, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)
        for lease_id, _, _ in releases:
            self._release_args.pop(lease_id, None)
            rfut = self._releasing.pop(lease_id, None)
            if rfut is not None and not rfut.done():
                rfut.set_exception(error)
                rfut.exception()

    # ------------------------------------------------------------------ restarts
    async def _survivable(self, exc: BaseException) -> bool:
        """Whether a failed broker call is worth sending again: the actor is restarting
        (Ray answers calls in flight with ``ActorUnavailableError``) and has not been
        unreachable for longer than ``reconnect`` seconds."""
        if self.closed or not isinstance(exc, RayActorError):
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
        self._submits[:0] = [a for a in submits if a.id in self.waiting]
        self._releases[:0] = releases
        self._resent_releases.update(lease_id for lease_id, _, _ in releases)
        self._beats[:0] = [i for i in beats if i in self._keep.held]
        self._cancels[:0] = cancels

    def _resubmit(self) -> None:
        """Submit every action still waited for again (same ids): after a restart the
        broker has them from its journal and the submission attaches to them; after a
        failed call whose reply may have carried a grant, it delivers that grant again."""
        outbox = {a.id for a in self._submits}
        for action_id, fut in self.waiting.items():
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
        if args is None or self.closed:
            return
        self._releases.append((lease_id, *args))
        self._kick()

    async def aclose(self) -> None:
        """Stop the pump; fail what waits, send what is still to release and cancel."""
        self.closed = True
        if self._wake is not None:
            self._wake.set()
        for task in list(self._tasks):
            task.cancel()  # a call already sent still runs in the broker
        waits, self._beat_waits = self._beat_waits, []
        _answer_beats(waits, None)
        # Queued actions leave the queue; releases not sent yet go out now, not at TTL.
        cancels = self._cancels + list(self.waiting)
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_exception(ActionCancelled("the client was closed"))
        self.waiting.clear()
        self._actions.clear()
        with contextlib.suppress(Exception):
            if self._releases or cancels:
                await self.broker.exchange.remote(self.id, [], self._releases, [], cancels, 0.0)
            await self.broker.goodbye.remote(self.id)
        self._releases, self._cancels, self._submits = [], [], []


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
