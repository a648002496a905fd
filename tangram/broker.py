"""The live broker: an asyncio driver around the sans-I/O core.

It turns grants into resolved futures for waiting callers, coalesces every change made
during one event-loop iteration into a single scheduling round, and keeps one timer for
the core's next deadline (a lease expiry or a quota refill). Its clock is the event
loop's (``tangram.leasing.loop_time``): the times it hands the core and the delays of its
timers are one time, so a loop that fast-forwards time (tests) drives both.

It is also the in-process door (``tangram.leasing.Door``): ``lease`` is the shared
``LeaseContext``, kept alive by the shared ``KeepAlive``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tangram.config import Config
from tangram.core.managers.base import Manager
from tangram.core.policy import Policy
from tangram.core.state import Core, Expiry, Grant, IdleClose
from tangram.journal import Journal, JournalUnavailable
from tangram.leasing import (
    ABANDONED,
    Beats,
    KeepAlive,
    LeaseContext,
    hand_over,
    loop_time,
    raced,
)
from tangram.spec import Action, ActionCancelled, Lease, TangramError

if TYPE_CHECKING:
    from tangram.executors.fencing import GrantSigner

Listener = Callable[[str, Any], None]
JOURNAL_FILE = "journal.sqlite3"
RETRY_JOURNAL = 0.5  # seconds between tries while the journal cannot write


class Broker:
    """Submit actions and await their leases; release, heartbeat, cancel, close. Bound
    to the event loop it runs on (its clock is that loop's)."""

    def __init__(
        self,
        pools: Mapping[str, Manager],
        policy: Policy | None = None,
        *,
        lease_ttl: float = 60.0,
        id_prefix: str = "",
        journal: Journal | None = None,
        max_queued_per_pool: int | None = None,
        trajectory_idle: float | None = None,
        signer: GrantSigner | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        # The loop's own ``time`` once the broker knows its loop (read on every change:
        # the cheapest way to that time); until then, whichever loop is running.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.clock: Callable[[], float] = loop_time
        with contextlib.suppress(RuntimeError):
            self._bind(asyncio.get_running_loop())
        clock = self.clock
        self.core = Core(
            pools,
            policy,
            lease_ttl=lease_ttl,
            cost_clock=time.perf_counter,
            id_prefix=id_prefix,
            start=clock(),
            max_queued_per_pool=max_queued_per_pool,
            trajectory_idle=trajectory_idle,
        )
        self.signer = signer  # signs every grant for the executors (Lease.grant)
        self.wall = wall  # what executors compare a signed grant's expiry with
        self._waiters: dict[str, asyncio.Future[Lease]] = {}
        self._round_pending = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # Leases held by ``lease`` contexts, renewed in one batch (re-signed when signing).
        self._keep: KeepAlive[Lease] = KeepAlive(self.heartbeat_many)
        self._listeners: list[Listener] = []
        self.journal = journal
        self.restored: list[Lease] = []
        self.requeued: list[Action] = []
        self.ended_restored: list[Lease] = []  # ended before a restart, kept a while
        # Resolved by the next successful journal flush: what ``sync`` callers wait on.
        # One future per caller (a cancelled caller cancels only its own).
        self._synced: list[asyncio.Future[None]] = []
        # Why the journal cannot write, while it cannot: nothing new is granted then.
        self.unavailable: str | None = None
        self._undelivered: list[Grant | Expiry | IdleClose] = []
        self._retry: asyncio.TimerHandle | None = None
        if journal is not None:
            # Every lease granted before a crash holds its units again, every queued
            # action is queued again in its place, and the fencing counter continues
            # above every token issued.
            restored = journal.restore_into(self.core, clock())
            self.restored, self.requeued = restored.leases, restored.queued
            self.ended_restored = restored.ended
            self.core.hold_until = restored.hold_until
            self.core.observers.append(journal)
            if signer is not None:  # executors accept restored leases at once
                for lease in self.restored:
                    self._sign(lease, clock())

    @classmethod
    def from_config(cls, cfg: Config, *, data_dir: str | Path | None = None, **kw: Any) -> Broker:
        """A broker for ``cfg``; with ``data_dir``, leases are journalled there and the
        ones a previous process granted are restored."""
        if data_dir is not None:
            kw["journal"] = Journal(Path(data_dir) / JOURNAL_FILE, durability=cfg.durability)
        return cls(
            cfg.build_pools(),
            cfg.build_policy(),
            lease_ttl=cfg.lease_ttl_seconds,
            max_queued_per_pool=cfg.max_queued_per_pool,
            trajectory_idle=cfg.trajectory_idle_seconds,
            **kw,
        )

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.clock = loop.time

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(kind, obj)`` on grant, release, expire (a Lease), cancel (an
        action id) and idle_close (an ``IdleClose``: the trajectory and its pinned nodes)."""
        self._listeners.append(listener)

    def _emit(self, kind: str, obj: Any) -> None:
        for fn in self._listeners:
            fn(kind, obj)

    # ------------------------------------------------------------------ operations
    def submit_nowait(self, action: Action) -> asyncio.Future[Lease]:
        """Queue the action (InvalidAction is raised here, nothing is queued) and return a
        future that resolves to its lease. Unavailable while the journal cannot write."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # built outside a loop, or in another than runs it
            self._bind(loop)
        if self.unavailable is not None:
            raise JournalUnavailable(self.unavailable)
        self.core.submit(action, loop.time())
        fut: asyncio.Future[Lease] = loop.create_future()
        self._waiters[action.id] = fut
        self._kick()
        return fut

    async def acquire(self, action: Action, timeout: float | None = None) -> Lease:
        """Submit and wait for the grant. On timeout or cancellation the action leaves the
        queue, and a grant that raced with it is released: nothing leaks."""
        fut = self.submit_nowait(action)
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            self._abandon(action.id, fut)
            raise

    def follow(self, action_id: str) -> asyncio.Future[Lease] | None:
        """The future of a queued action, made on first use for one restored from the
        journal (its client polls again after the restart); None if it is not queued."""
        fut = self._waiters.get(action_id)
        if fut is None and self.core.is_queued(action_id):
            fut = self._waiters[action_id] = asyncio.get_running_loop().create_future()
        return fut

    async def sync(self) -> None:
        """Return once every change made so far is durable (at once without a journal);
        Unavailable if the journal cannot write. A door awaits this before it answers a
        change, so nothing a client is told is lost in a crash; changes made in one loop
        iteration share one commit."""
        if self.journal is None:
            return
        if self.unavailable is not None:
            raise JournalUnavailable(self.unavailable)
        if not self.journal.pending and not self._round_pending:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._synced.append(fut)
        self._kick()
        await fut

    def _abandon(self, action_id: str, fut: asyncio.Future[Lease]) -> None:
        self._waiters.pop(action_id, None)
        lease = raced(fut)
        if lease is not None:
            self.release(lease.id, outcome=ABANDONED)
        elif self.core.cancel(action_id, self.clock()) is not None:
            self._emit("cancel", action_id)
            self._kick()
        if not fut.done():
            fut.cancel()

    def release(
        self, lease_id: str, outcome: str = "ok", usage: dict[str, Any] | None = None
    ) -> Lease | None:
        """Return the lease's units. None if it was already released; LeaseExpired if
        it expired first."""
        self._keep.drop(lease_id)
        lease = self.core.release(lease_id, self.clock(), outcome, usage)
        if lease is not None:
            if self._listeners:
                self._emit("release", lease)
            self._kick()
        return lease

    def heartbeat(self, lease_id: str, ttl: float | None = None) -> float:
        now = self.clock()
        at = self.core.heartbeat(lease_id, now, ttl)
        if self.signer is not None:
            self._sign(self.core.leases[lease_id], now)  # a grant with the new expiry
        if self._timer_at is not None and at < self._timer_at:
            # A shorter TTL moved this lease's deadline before the armed timer.
            self._arm(now)
        if self.journal is not None:
            self._kick()  # the round makes the new deadline durable
        return at

    def _sign(self, lease: Lease, now: float) -> None:
        # The core's times are on ``clock`` (the loop's, this process's own); executors
        # compare the expiry with their wall clock. The offset is taken at each signing,
        # so a wall clock that NTP slews away from the monotonic one is followed.
        assert self.signer is not None
        expires = lease.expires_at + (self.wall() - now)
        lease.grant = self.signer.sign(lease.id, lease.fencing_token, lease.allocation, expires)

    def cancel(self, action_id: str) -> bool:
        """Cancel a queued action; its waiter gets ActionCancelled. False if not queued."""
        if self.core.cancel(action_id, self.clock()) is None:
            return False
        fut = self._waiters.pop(action_id, None)
        if fut is not None and not fut.done():
            fut.set_exception(ActionCancelled(f"action {action_id!r} was cancelled"))
        self._emit("cancel", action_id)
        self._kick()
        return True

    def close_trajectory(self, trajectory: str) -> int:
        """Free the trajectory's pinned memory; cancel its queued actions. Returns how
        many were cancelled."""
        cancelled = self.core.close_trajectory(trajectory, self.clock())
        for c in cancelled:
            fut = self._waiters.pop(c.action.id, None)
            if fut is not None and not fut.done():
                fut.set_exception(ActionCancelled(f"trajectory {trajectory!r} was closed"))
            self._emit("cancel", c.action.id)
        self._kick()
        return len(cancelled)

    def observe(self, pool: str, what: str, key: str, value: float) -> None:
        """Feed an executor's measurement into a pool's cost model (``Core.observe``);
        the next round schedules with it."""
        self.core.observe(pool, what, key, value, self.clock())
        self._kick()

    def snapshot(self) -> dict[str, Any]:
        return self.core.snapshot(self.clock())

    def overview(self, visible: Callable[[Action], bool] | None = None) -> dict[str, Any]:
        """The pools (policy, queued, leases, pools: the ``GET /v1/pools`` document), and
        the queue per pool and tenant, the oldest waiters and why, the leases by age
        (``Core.overview``); times are ages, not this broker's clock. What
        ``GET /v1/status`` and the Ray client's ``status()`` answer."""
        snap = self.snapshot()
        return {
            "policy": snap["policy"],
            "queued": snap["queued"],
            "leases": snap["leases"],
            "pools": snap["pools"],
            **self.core.overview(self.clock(), visible=visible),
        }

    def why_waiting(self, action_id: str) -> dict[str, Any] | None:
        """Why a queued action waits (``Core.why_waiting``); None if it is not queued.
        ``ready_at`` is on this broker's clock."""
        return self.core.why_waiting(action_id, self.clock())

    def lease(self, action: Action, *, timeout: float | None = None) -> LeaseContext[Action, Lease]:
        """``async with broker.lease(action) as lease:`` holds the units for the body and
        releases them on exit, also on exceptions and cancellation. The lease is kept
        alive (batched heartbeats, re-signed grants) while the body runs."""
        return LeaseContext(self, self._keep, action, timeout)

    # ------------------------------------------------------------------ the door protocol
    async def release_lease(
        self, lease: Lease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        self.release(lease.id, outcome, None if usage is None else dict(usage))

    async def heartbeat_many(self, leases: Sequence[Lease]) -> Beats:
        """Renew the leases at once (the keep-alive's call): each grant is re-signed with
        its new expiry, and the timer moves if a deadline came before it."""
        now = self.clock()
        core = self.core
        out: Beats = {}
        for lease in leases:
            try:
                out[lease.id] = core.heartbeat(lease.id, now)
            except TangramError as exc:
                out[lease.id] = exc
                continue
            if self.signer is not None:
                self._sign(core.leases[lease.id], now)
        self._arm(now)
        return out

    async def cancel_action(self, action_id: str) -> bool:
        return self.cancel(action_id)

    # ------------------------------------------------------------------ the driver
    def _kick(self) -> None:
        """Run one round soon, once for everything that changed in this loop iteration."""
        if not self._round_pending:
            self._round_pending = True
            asyncio.get_running_loop().call_soon(self._round)

    def _round(self) -> None:
        self._round_pending = False
        now = self.clock()
        if self.unavailable is None:
            self._undelivered.extend(self.core.step(now))
        else:
            # Nothing new is granted while grants cannot be made durable; leases still
            # expire on time.
            self._undelivered.extend(self.core.expire(now))
        if self.journal is not None:
            # Durable before anyone hears of a change: one commit for the whole round.
            try:
                self.journal.flush()
            except JournalUnavailable as exc:
                self._journal_failed(str(exc), now)
                return
            if self.unavailable is not None:
                self.unavailable = None
                self._kick()  # grant what waited meanwhile
            synced, self._synced = self._synced, []
            for done in synced:
                if not done.done():
                    done.set_result(None)
        events, self._undelivered = self._undelivered, []
        for ev in events:
            if isinstance(ev, Grant):
                if self.signer is not None:
                    self._sign(ev.lease, now)
                fut = self._waiters.pop(ev.action.id, None)
                self._emit("grant", ev.lease)
                if not hand_over(fut, ev.lease):
                    # Nobody waits any more (cancelled between rounds): give it back.
                    self.core.release(ev.lease.id, now, ABANDONED)
                    self._emit("release", ev.lease)
                    self._kick()
            elif isinstance(ev, Expiry):
                self._keep.drop(ev.lease.id)
                self._emit("expire", ev.lease)
                self._kick()
            else:
                self._emit("idle_close", ev)
        self._arm(now)

    def _journal_failed(self, why: str, now: float) -> None:
        """Fail closed: answer Unavailable, keep what the round decided for delivery once
        a write succeeds, and try again soon (the expiry timer keeps running)."""
        self.unavailable = why
        synced, self._synced = self._synced, []
        for done in synced:
            if not done.done():
                done.set_exception(JournalUnavailable(why))
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(RETRY_JOURNAL, self._retry_journal)
        self._arm(now)

    def _retry_journal(self) -> None:
        self._retry = None
        self._round()

    def _arm(self, now: float) -> None:
        at = self.core.next_wakeup()
        if at is None or (self._timer is not None and self._timer_at == at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - now), self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self._round()

    async def close(self) -> None:
        """Stop timers; fail every waiter. Leases stay as they are."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._keep.close()
        for aid, fut in list(self._waiters.items()):
            if not fut.done():
                fut.set_exception(ActionCancelled("broker closed"))
            self.core.cancel(aid, self.clock())
        self._waiters.clear()
        if self.journal is not None:
            with contextlib.suppress(JournalUnavailable):
                self.journal.flush()
