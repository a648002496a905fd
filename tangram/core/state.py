"""The sans-I/O broker core: the unified action queue, scheduling rounds, leases, expiry.

Events go in as method calls that carry ``now`` (submit, release, heartbeat, cancel,
close a trajectory, expire, schedule); decisions come out as return values (grants with
exact units, expiries, cancellations). The core never reads a clock of its own (the
optional ``cost_clock`` only measures how long a round took, for the overhead figure),
never awaits and never does I/O, so the live broker and the simulator drive the very
same code.
"""

from __future__ import annotations

import base64
import bisect
import itertools
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tangram.core.entries import Admitted, Entry
from tangram.core.leases import LeaseTable, expired
from tangram.core.managers.base import Manager, Scratch
from tangram.core.policies.base import Policy
from tangram.core.policies.tangram import Tangram
from tangram.core.validate import validate
from tangram.spec import (
    Action,
    Allocation,
    InvalidAction,
    Lease,
    QueueFull,
)


def random_ids() -> Callable[[str], str]:
    """Ids nobody can guess or that come back: ``kind`` and 96 random bits. Knowing a
    lease id is what lets a caller release or heartbeat it, and an id that a restart
    issued again would hand one client another's action. One generator per core (a core
    is used by one thread), so no lock."""
    tokens = _random_tokens().__next__
    return lambda kind: kind + tokens()


def _random_tokens() -> Iterator[str]:
    # 96 bits from the OS's CSPRNG each, 256 at a time: a call per id cost more than the
    # rest of a grant.
    while True:
        text = base64.urlsafe_b64encode(os.urandom(12 * 256)).decode()
        for i in range(0, len(text), 16):
            yield text[i : i + 16]


def counting_ids() -> Callable[[str], str]:
    """Ids ``a1``, ``l1``, ... for the simulator, whose runs must repeat exactly."""
    counter = itertools.count(1)
    return lambda kind: f"{kind}{next(counter)}"


class Observer(Protocol):
    """Something told of every event the core decides (metrics, a journal). Called
    synchronously; it must not call back into the core."""

    def on_submit(self, action: Action, now: float) -> None: ...
    def on_refuse(self, action: Action, reason: str) -> None: ...
    def on_grant(self, lease: Lease, now: float) -> None: ...
    def on_end(self, lease: Lease, now: float) -> None: ...  # released or expired
    def on_heartbeat(self, lease: Lease, now: float) -> None: ...
    def on_cancel(self, action: Action, now: float) -> None: ...
    def on_round(self, seconds: float, candidates: int, deferred: int) -> None: ...


@dataclass(slots=True)
class Grant:
    action: Action
    lease: Lease


@dataclass(slots=True)
class Expiry:
    lease: Lease


@dataclass(slots=True)
class Cancellation:
    action: Action
    reason: str


# Buckets of ``Core.overview``'s leases by age: (label, upper bound in seconds).
LEASE_AGES = (("<10s", 10.0), ("10s-1m", 60.0), ("1m-10m", 600.0), (">=10m", math.inf))


@dataclass(slots=True)
class IdleClose:
    """A trajectory with nothing queued or held for ``trajectory_idle`` seconds was
    closed, as if its client had closed it (its pins and reserved memory are free)."""

    trajectory: str
    pinned: dict[str, str]  # pool -> the node it was pinned to (its sandbox directory)


@dataclass(slots=True)
class _Round:
    """What one scheduling round collects while it walks the queue."""

    scratches: dict[str, Scratch] = field(default_factory=dict)
    admitted: list[Admitted] = field(default_factory=list)
    waiting: list[Entry] = field(default_factory=list)  # in the walk's order
    saturated: set[str] = field(default_factory=set)
    firsts: list[tuple[str, Entry]] = field(default_factory=list)  # first waiter per pool


@dataclass(slots=True)
class RoundStats:
    rounds: int = 0
    candidates: int = 0
    deferred: int = 0
    seconds: float = 0.0


class Core:
    def __init__(
        self,
        pools: Mapping[str, Manager],
        policy: Policy | None = None,
        *,
        lease_ttl: float = 60.0,
        cost_clock: Callable[[], float] | None = None,
        id_prefix: str = "",
        start: float | None = None,
        max_queued_per_pool: int | None = None,
        ids: Callable[[str], str] | None = None,
        trajectory_idle: float | None = None,
        tenant_bounds: Mapping[str | None, int] | None = None,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        if trajectory_idle is not None and not trajectory_idle > 0:
            raise ValueError("trajectory_idle must be positive (or None: never)")
        self.pools = dict(pools)
        self.lease_ttl = lease_ttl
        # Beyond this many queued actions a pool refuses more (memory stays bounded).
        self.max_queued_per_pool = max_queued_per_pool
        self._cost_clock = cost_clock
        self._prefix = id_prefix
        self._ids = ids or random_ids()
        self._queue: dict[str, Entry] = {}  # in FCFS order
        self._queued_pools: Counter[str] = Counter()
        # A policy of this core's own (the elastic ones keep an index of their leases).
        self.policy = (policy or Tangram()).bind(self.pools, self._queued_pools)
        # When the policy orders the queue (``overdue`` > 0): every queued action as
        # its ``Entry.order`` (expected duration, seq, id) and the entry, kept sorted as
        # actions come and go, so a round walks the shortest first without sorting the
        # queue. (seq and id are unique: a comparison never reaches the entry.)
        self._shortest: list[tuple[float, int, str, Entry]] | None = (
            [] if self.policy.overdue > 0.0 else None
        )
        # Queued actions per (pool, tenant): a full pool still takes a tenant below its
        # fair share, so one tenant cannot lock the others out.
        self._queued_tenants: Counter[tuple[str, str | None]] = Counter()
        # Queued actions a tenant may have at most (whatever door they came through);
        # a tenant without an entry has none.
        self.tenant_bounds: dict[str | None, int] = {}
        self._bound_floor = 0  # below this many queued actions no bound can be reached
        self.bound_tenants(tenant_bounds or {})
        self._queued_by_tenant: Counter[str | None] = Counter()
        # Trajectories: how many of their actions are queued or held, and since when
        # those with none have been idle (in that order), to close them after
        # ``trajectory_idle`` seconds: a client that never closes leaks nothing.
        self.trajectory_idle = trajectory_idle
        self._active: Counter[str] = Counter()
        self._idle: OrderedDict[str, float] = OrderedDict()
        self._closed: set[str] = set()  # closed by their client while leases still ran
        self.table = LeaseTable(self._ids, self._prefix)
        # The table's live leases and action -> lease index, read by drivers.
        self.leases = self.table.live
        self.lease_of = self.table.of_action
        self.observers: list[Observer] = []  # told of every event (metrics, journals)
        self._ready_at: float | None = None
        self._seq = 0
        # Nothing is granted before this time (a journal that lost transactions: leases
        # it forgot may still be held until then).
        self.hold_until: float | None = None
        self.stats = RoundStats()
        self.counts: Counter[str] = Counter()  # submitted, granted, released, expired, ...
        if start is not None:  # idle time counts from here, not from the first grant
            for mgr in self.pools.values():
                mgr.tick(start)

    # ------------------------------------------------------------------ submission
    def validate(self, action: Action) -> dict[str, tuple[int, ...]]:
        """Check an action against the pools (tangram.core.validate); return the feasible
        amounts per pool. Raises InvalidAction saying what is wrong and what would fit.
        The action is not changed."""
        return validate(action, self.pools)[0]

    def submit(self, action: Action, now: float, *, restored: bool = False) -> Action:
        """Queue a valid action; raise InvalidAction (or QueueFull), changing nothing.

        The core takes the action: it fills in what it decides (an id if it has none, its
        FCFS place ``seq``, ``submitted_at``, and its key pool when it names none and one
        demand is elastic) and reads it until it leaves the queue and its lease ends, so
        the caller must not change it afterwards. (Copying it instead would cost every
        submit a copy; every driver hands over an action it built for this call.)

        ``restored``: an action a journal recorded as queued before a restart keeps its
        id, its place (``seq``) and its submit time, and is not refused for a full pool."""
        try:
            feasible, key = validate(action, self.pools)
            if action.id and (action.id in self._queue or action.id in self.lease_of):
                raise InvalidAction(f"action id {action.id!r} is already in use", "duplicate_id")
            if not restored and len(self._queue) >= self._bound_floor:
                self._check_bound(action)
        except InvalidAction as exc:
            self.counts["refused"] += 1
            for o in self.observers:
                o.on_refuse(action, exc.reason)
            raise
        except QueueFull:
            self.counts["refused"] += 1
            for o in self.observers:
                o.on_refuse(action, "queue_full")
            raise
        action.key = key
        if restored:
            self._seq = max(self._seq, action.seq)
        else:
            self._seq += 1
            action.seq = self._seq
            action.submitted_at = now
        if not action.id:
            action.id = self._prefix + self._ids("a")
        entry = Entry(action, feasible)
        policy = self.policy
        policy.prepare(entry)
        self._queue[action.id] = entry
        if self._shortest is not None:
            entry.order = order = (policy.expected(entry), action.seq, action.id)
            bisect.insort(self._shortest, (*order, entry))
        tenant = action.tenant
        self._queued_by_tenant[tenant] += 1
        queued, tenants = self._queued_pools, self._queued_tenants
        for p in action.demands:
            queued[p] += 1
            tenants[p, tenant] += 1
        self._busy(action.trajectory)
        self.counts["submitted"] += 1
        for o in self.observers:
            o.on_submit(action, now)
        return action

    def bound_tenants(self, bounds: Mapping[str | None, int]) -> None:
        """Set the bound on queued actions of each tenant in ``bounds`` (a tenant without
        one has none)."""
        self.tenant_bounds.update(bounds)
        floors = [*self.tenant_bounds.values()]
        if self.max_queued_per_pool is not None:
            floors.append(self.max_queued_per_pool)
        self._bound_floor = min(floors, default=1 << 62)

    def _check_bound(self, action: Action) -> None:
        """QueueFull when a pool the action demands is full. A full pool still takes a
        tenant below its fair share (the bound over the tenants queued there), up to
        twice the bound in all: one tenant's burst cannot lock the others out."""
        tenant = action.tenant
        limit = self.tenant_bounds.get(tenant)
        if limit is not None and self._queued_by_tenant[tenant] >= limit:
            who = f"tenant {tenant!r}" if tenant is not None else "this broker's tenant"
            raise QueueFull(
                f"{who} already has {self._queued_by_tenant[tenant]} queued actions, the "
                f"bound is {limit}; retry shortly, or cancel queued actions"
            )
        bound = self.max_queued_per_pool
        if bound is None:
            return
        for p in action.demands:
            n = self._queued_pools[p]
            if n < bound:
                continue
            mine = self._queued_tenants[p, action.tenant]
            tenants = sum(1 for (q, _), k in self._queued_tenants.items() if q == p and k > 0)
            if mine == 0:
                tenants += 1
            share = -(-bound // max(1, tenants))
            if mine < share and n < 2 * bound:
                continue
            who = f" (tenant {action.tenant!r} has {mine}, its share)" if mine else ""
            raise QueueFull(
                f"pool {p!r} already has {n} queued actions, its bound "
                f"(max_queued_per_pool){who}; try again shortly"
            )

    def _dequeue(self, entry: Entry) -> None:
        action = entry.action
        del self._queue[action.id]
        shortest = self._shortest
        if shortest is not None and entry.order is not None:
            # The 3-tuple sorts just before its own 4-tuple: bisect lands on it.
            del shortest[bisect.bisect_left(shortest, entry.order)]
        queued = self._queued_pools
        tenants = self._queued_tenants
        tenant = action.tenant
        self._queued_by_tenant[tenant] -= 1
        for p in action.demands:
            queued[p] -= 1
            key = (p, tenant)
            tenants[key] -= 1
            if not tenants[key]:
                del tenants[key]

    # ------------------------------------------------------------------ trajectories
    def _busy(self, trajectory: str) -> None:
        self._active[trajectory] += 1
        self._idle.pop(trajectory, None)
        self._closed.discard(trajectory)

    def _done(self, trajectory: str, now: float) -> None:
        """One of the trajectory's actions left the queue without a lease, or its lease
        ended."""
        active = self._active
        n = active[trajectory] - 1
        if n > 0:
            active[trajectory] = n
            return
        del active[trajectory]
        if trajectory in self._closed:
            self._closed.discard(trajectory)
        elif self.trajectory_idle is not None:
            self._idle[trajectory] = now

    @property
    def active_trajectories(self) -> int:
        """Trajectories with an action queued or held now."""
        return len(self._active)

    def close_idle(self, now: float) -> list[IdleClose]:
        """Close every trajectory idle for ``trajectory_idle`` seconds by ``now``."""
        out: list[IdleClose] = []
        limit = self.trajectory_idle
        if limit is None:
            return out
        idle = self._idle
        while idle:
            traj, since = next(iter(idle.items()))
            if since + limit > now:
                break
            del idle[traj]
            pinned = {}
            for pool, mgr in self.pools.items():
                node = mgr.close_trajectory(traj)
                if node is not None:
                    pinned[pool] = node
            self.counts["idle_closed"] += 1
            out.append(IdleClose(traj, pinned))
        return out

    def cancel(self, action_id: str, now: float) -> Action | None:
        """Remove a queued action; None if it is not queued (granted, ended or unknown)."""
        entry = self._queue.get(action_id)
        if entry is None:
            return None
        self._dequeue(entry)
        self._done(entry.action.trajectory, now)
        self.counts["cancelled"] += 1
        for o in self.observers:
            o.on_cancel(entry.action, now)
        return entry.action

    def close_trajectory(self, trajectory: str, now: float) -> list[Cancellation]:
        """Free what the trajectory holds between actions and cancel its queued actions."""
        for mgr in self.pools.values():
            mgr.tick(now)
            mgr.close_trajectory(trajectory)
        out = []
        for entry in [e for e in self._queue.values() if e.action.trajectory == trajectory]:
            self._dequeue(entry)
            self._done(trajectory, now)
            self.counts["cancelled"] += 1
            for o in self.observers:
                o.on_cancel(entry.action, now)
            out.append(Cancellation(entry.action, "trajectory closed"))
        self._idle.pop(trajectory, None)
        if trajectory in self._active:  # its running leases end later: closed already
            self._closed.add(trajectory)
        return out

    def observe(self, pool: str, what: str, key: str, value: float, now: float) -> None:
        """A measurement an executor made that corrects a pool's cost model (a GPU
        service's restore seconds); ValueError for an unknown pool or measurement. It
        goes through the core, like every other event, rather than into a manager."""
        mgr = self.pools.get(pool)
        if mgr is None:
            raise ValueError(f"unknown pool {pool!r}")
        mgr.tick(now)
        mgr.observe(what, key, value)
        self.counts["observed"] += 1

    def queued(self) -> Iterable[Action]:
        return (e.action for e in self._queue.values())

    def is_queued(self, action_id: str) -> bool:
        return action_id in self._queue

    def why_waiting(self, action_id: str, now: float) -> dict[str, Any] | None:
        """Why a queued action is not granted, from the state now (None if it is not
        queued): which pool holds it and why, in words (``message``) and as fields
        (``pool``, ``reason``, and what the pool's manager adds: ``node``, ``needs``,
        ``free``, ``limit``, ``ready_at``; ``ahead``: waiters a round walks before it,
        competing for the same units). Read only: it reserves nothing and changes no
        decision. Reasons: ``held_after_restart`` (``hold_until``), a manager's
        (``insufficient_units``, ``rate_limited``, ``memory``, ...),
        ``behind_earlier_action`` (its units are free but waiters walked before it come
        first: FCFS, or under ``tangram`` overdue and shorter ones), ``next_round``
        (nothing holds it now: the next round admits it, unless the arrangement defers
        it)."""
        entry = self._queue.get(action_id)
        if entry is None:
            return None
        if self.hold_until is not None and now < self.hold_until:
            return {
                "reason": "held_after_restart",
                "message": "nothing is granted until "
                f"{self.hold_until - now:.3g} s from now: after a restart the journal may "
                "have lost leases that are still held",
                "ready_at": self.hold_until,
            }
        action = entry.action
        ahead = self._ahead(entry, now)
        first: dict[str, Any] | None = None
        for p in action.demands:
            mgr = self.pools[p]
            amount = self.policy.key_amount(entry) if p == action.key else entry.feasible[p][0]
            why = mgr.why(action, amount, now)
            if why is None:
                continue
            n = self._competing(mgr, ahead.get(p, ()), why.get("node"))
            out = {"pool": p, **why, "ahead": n}
            if n:
                where = " on that node" if "node" in why else ""
                out["message"] += f"; {n} action{'s' if n != 1 else ''} ahead of it wait{where}"
            if first is None:
                first = out
        if first is not None:
            return first
        order = "FCFS" if self._shortest is None else "overdue, then shortest first"
        for p in action.demands:
            mgr = self.pools[p]
            n = self._competing(mgr, ahead.get(p, ()), mgr.pin_of(action.trajectory))
            if n:
                return {
                    "pool": p,
                    "reason": "behind_earlier_action",
                    "message": f"pool {p!r} has the {mgr.unit} it needs free, but "
                    f"{n} action{'s' if n != 1 else ''} waiting for it come first ({order})",
                    "ahead": n,
                }
        return {
            "reason": "next_round",
            "message": "its units are free and no earlier action waits for them: the next "
            "scheduling round admits it, unless the arrangement defers it",
        }

    def _ahead(self, entry: Entry, now: float) -> dict[str, list[Action]]:
        """The queued actions a round walks before ``entry`` (``_walk``: FCFS, or overdue
        first and then the shortest) per pool it demands."""
        mine = entry.action.demands
        out: dict[str, list[Action]] = {}
        for other in self._walk(now):
            if other is entry:
                break
            for p in other.action.demands:
                if p in mine:
                    out.setdefault(p, []).append(other.action)
        return out

    @staticmethod
    def _competing(mgr: Manager, ahead: Iterable[Action], node: str | None) -> int:
        """How many of ``ahead`` compete for the units of ``node`` (all, without one):
        those pinned there, and new trajectories, which may go anywhere."""
        if node is None:
            return sum(1 for _ in ahead)
        return sum(1 for a in ahead if mgr.pin_of(a.trajectory) in (node, None))

    def overview(
        self, now: float, *, visible: Callable[[Action], bool] | None = None, oldest: int = 5
    ) -> dict[str, Any]:
        """What an operator asks of a running broker (``tangram status``): queued actions
        per pool and tenant, the ``oldest`` waiters with why each waits, and the leases
        held by age (``LEASE_AGES``) with the oldest ones. Actions ``visible`` says no to
        (another tenant's) are counted but not listed."""
        per_pool: dict[str, dict[str, int]] = {}
        for (pool, tenant), n in self._queued_tenants.items():
            if n > 0:
                per_pool.setdefault(pool, {})[tenant or ""] = n
        waiters: list[dict[str, Any]] = []
        for entry in self._queue.values():  # insertion order: the oldest first
            if len(waiters) >= oldest:
                break
            a = entry.action
            if visible is not None and not visible(a):
                continue
            why = self.why_waiting(a.id, now) or {}
            waiters.append(
                {
                    "action": a.id,
                    "trajectory": a.trajectory,
                    "tenant": a.tenant,
                    "pools": sorted(a.demands),
                    "waited_seconds": round(now - a.submitted_at, 3),
                    "reason": why.get("reason"),
                    "message": why.get("message"),
                }
            )
        ages = [(now - lease.granted_at, lease) for lease in self.leases.values()]
        ages.sort(key=lambda x: -x[0])
        buckets = dict.fromkeys((label for label, _ in LEASE_AGES), 0)
        for age, _ in ages:
            label = next(label for label, upper in LEASE_AGES if age < upper)
            buckets[label] += 1
        held = [
            {
                "action": lease.action.id,
                "trajectory": lease.action.trajectory,
                "tenant": lease.action.tenant,
                "pools": {p: alloc.amount for p, alloc in lease.allocation.items()},
                "age_seconds": round(age, 3),
            }
            for age, lease in ages
            if visible is None or visible(lease.action)
        ][:oldest]
        return {
            "queued_by_tenant": per_pool,
            "oldest_waiting": waiters,
            "leases_by_age": buckets,
            "oldest_leases": held,
        }

    def queued_per_pool(self) -> dict[str, int]:
        """How many queued actions demand each pool."""
        return {p: n for p, n in self._queued_pools.items() if n > 0}

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ leases
    def lease_state(self, lease_id: str) -> str:
        """granted, released or expired; UnknownLease if never seen (or long forgotten)."""
        return self.table.state(lease_id)

    @property
    def fencing(self) -> int:
        """The newest fencing token issued."""
        return self.table.fencing

    @property
    def ended(self) -> OrderedDict[str, tuple[str, float, float]]:
        return self.table.ended

    def release(
        self,
        lease_id: str,
        now: float,
        outcome: str = "ok",
        usage: dict[str, Any] | None = None,
    ) -> Lease | None:
        """Return the lease's units and the lease. Releasing twice is not an error (None
        the second time); releasing a lease that expired raises LeaseExpired."""
        table = self.table
        lease = table.live.get(lease_id)
        if lease is not None and table.deadline(lease_id) <= now:
            # Past its deadline it is expired, whether or not expire() ran yet.
            self.expire(now)
            lease = None
        if lease is None:
            err = table.ended_error(lease_id, releasing=True, now=now)
            if err is not None:
                raise err
            return None
        if outcome == "error":
            for pool, alloc in lease.allocation.items():
                self.pools[pool].failed(lease.action, alloc)
        lease.outcome = outcome
        table.close(lease, "released", now)
        self._free(lease, now, usage)
        self.counts["released"] += 1
        return lease

    def resume(self, fencing: int, seq: int) -> None:
        """Continue the fencing counter and action numbering above what an earlier life
        of this broker issued (as recorded by its journal)."""
        self.table.fencing = max(self.table.fencing, fencing)
        self._seq = max(self._seq, seq)

    def restore(self, lease: Lease, now: float) -> None:
        """Take back a lease recorded before a restart: exactly its units, its id, its
        fencing token (the counter continues above it) and its deadline. ValueError if
        its pools or units do not match this configuration (nothing is taken then)."""
        action = lease.action
        if lease.id in self.table.live or action.id in self.table.of_action:
            raise ValueError(f"lease {lease.id!r} is already live")
        unknown = set(lease.allocation) - set(self.pools)
        if unknown:
            raise ValueError(f"lease {lease.id!r} holds units of unknown pools {unknown}")
        taken: list[tuple[str, Allocation]] = []
        try:
            for pool, alloc in lease.allocation.items():
                self.pools[pool].claim(action, alloc, now)
                taken.append((pool, alloc))
        except ValueError:
            for pool, alloc in taken:
                self.pools[pool].release(action, alloc, now, None)
            raise
        for pool, alloc in lease.allocation.items():
            if self.pools[pool].shares_units:
                self.pools[pool].granted(alloc, lease.fencing_token)
        self._seq = max(self._seq, action.seq)
        self.table.adopt(lease)
        self._busy(action.trajectory)
        self.policy.on_grant(lease)

    def remember(self, lease: Lease) -> None:
        """Know an ended lease recorded before a restart, so a release retried across
        the restart is answered as released (or expired), not as unknown."""
        self.table.remember(lease)

    def heartbeat(self, lease_id: str, now: float, ttl: float | None = None) -> float:
        """Extend an active lease's TTL from now; return the new expiry time."""
        table = self.table
        lease = table.live.get(lease_id)
        if lease is None:
            err = table.ended_error(lease_id, releasing=False, now=now)
            assert err is not None
            raise err
        if table.deadline(lease_id) <= now:  # past its TTL, not yet collected by expire()
            raise expired(lease_id, now - table.deadline(lease_id))
        at = table.extend(lease, now, ttl)
        for o in self.observers:
            o.on_heartbeat(lease, now)
        return at

    def expire(self, now: float) -> list[Expiry]:
        """Take back the units of every lease whose TTL ran out by ``now``."""
        out: list[Expiry] = []
        for lease in self.table.due(now):
            lease.outcome = "expired"
            self.table.close(lease, "expired", now)
            self._free(lease, now, None)
            self.counts["expired"] += 1
            out.append(Expiry(lease))
        return out

    def _free(self, lease: Lease, now: float, usage: dict[str, Any] | None) -> None:
        """Give an ended lease's units back (the table has closed it)."""
        for pool, alloc in lease.allocation.items():
            self.pools[pool].release(lease.action, alloc, now, usage)
        self._done(lease.action.trajectory, now)
        self.policy.on_end(lease)
        for o in self.observers:
            o.on_end(lease, now)

    def next_wakeup(self) -> float | None:
        """The earliest time at which time alone changes something (an expiry, a quota
        refill that may admit a waiting action)."""
        t = self.table.next_deadline()
        if self._ready_at is not None and (t is None or self._ready_at < t):
            t = self._ready_at
        if self._idle and self.trajectory_idle is not None:
            idle_at = next(iter(self._idle.values())) + self.trajectory_idle
            if t is None or idle_at < t:
                t = idle_at
        return t

    def step(self, now: float) -> list[Grant | Expiry | IdleClose]:
        """Expire what is due, close idle trajectories, then run a scheduling round."""
        events: list[Grant | Expiry | IdleClose] = list(self.expire(now))
        if self._idle:
            events.extend(self.close_idle(now))
        events.extend(self.schedule(now))
        return events

    # ------------------------------------------------------------------ scheduling
    def schedule(self, now: float) -> list[Grant]:
        """One scheduling round: FCFS admission at minimum, elastic arrangement per
        partition (tangram policy), then exact allocation. Returns the grants."""
        self._ready_at = None
        if not self._queue:
            return []
        if self.hold_until is not None:
            if now < self.hold_until:
                self._ready_at = self.hold_until
                return []
            self.hold_until = None
        clock = self._cost_clock
        t0 = clock() if clock is not None else 0.0
        rnd = _Round()
        self._admit(rnd, now)
        deferred: set[str] = set()
        if rnd.admitted:
            self.policy.arrange(rnd.admitted, rnd.waiting, rnd.scratches, now, deferred)
        if deferred:
            self._cascade(rnd.admitted, deferred)
        grants = self._commit(rnd.admitted, deferred, now)
        self._note_ready(rnd.firsts, now)

        st = self.stats
        st.rounds += 1
        st.candidates += len(rnd.admitted)
        st.deferred += len(deferred)
        cost = 0.0
        if clock is not None:
            cost = clock() - t0
            st.seconds += cost
        for g in grants:
            g.lease.overhead = cost
        for o in self.observers:
            for g in grants:
                o.on_grant(g.lease, now)
            o.on_round(cost, len(rnd.admitted), len(deferred))
        return grants

    def _walk(self, now: float) -> Iterator[Entry]:
        """The queue in the order a round considers it: FCFS, or, when the policy orders
        it, the overdue actions (queued ``overdue`` seconds or longer: a FCFS prefix of
        the queue) in FCFS order, then the others by expected duration, shortest first.
        Lazy: a round that saturates every pool early reads only the head."""
        shortest = self._shortest
        if shortest is None:
            yield from self._queue.values()
            return
        cutoff = now - self.policy.overdue
        queue = self._queue
        walked: set[str] = set()
        for entry in queue.values():
            if entry.action.submitted_at > cutoff:
                break
            walked.add(entry.action.id)
            yield entry
        if not walked:
            for item in shortest:
                yield item[3]
        elif len(walked) < len(queue):
            for item in shortest:
                if item[2] not in walked:
                    yield item[3]

    def _admit(self, rnd: _Round, now: float) -> None:
        """Walk the queue (``_walk``) admitting every action whose minimum fits, unless a
        waiter met earlier in the walk competes for the same units. Stops when every pool
        in demand is saturated (after ``lookahead`` more waiters when the estimate will
        need them)."""
        policy = self.policy
        scratches = rnd.scratches
        active = sum(1 for n in self._queued_pools.values() if n > 0)
        look = policy.lookahead
        elastic = False  # whether any admitted action lets the DP trade units for time
        for entry in self._walk(now):
            if len(rnd.saturated) == active:
                if look <= 0 or not elastic:
                    break
                look -= 1
                rnd.waiting.append(entry)
                continue
            action = entry.action
            scrs = []
            for p in action.demands:
                s = scratches.get(p)
                if s is None:
                    s = scratches[p] = self.pools[p].begin_round(now)
                scrs.append((p, s))
            blocked = False
            for _, s in scrs:
                if s.blocked(action):
                    blocked = True
                    break
            if blocked:
                self._block(entry, scrs, rnd)
                continue
            adm = Admitted(entry, {})
            key = action.key
            for p, s in scrs:
                amount = policy.key_amount(entry) if p == key else entry.feasible[p][0]
                part = s.fit(action, amount)
                if part is None:
                    for q, got in adm.amounts.items():
                        scratches[q].unfit(action, got, adm.parts[q])
                    self._block(entry, scrs, rnd)
                    break
                adm.amounts[p] = amount
                adm.parts[p] = part
            else:
                rnd.admitted.append(adm)
                elastic = elastic or entry.wait is not None

    def _cascade(self, admitted: list[Admitted], deferred: set[str]) -> None:
        """No later action may overtake a deferred one on the units it competes for."""
        held: set[tuple[str, Hashable]] = set()
        for adm in admitted:
            keys = [(p, adm.parts[p]) for p in adm.amounts]
            if adm.entry.action.id in deferred or any(k in held for k in keys):
                deferred.add(adm.entry.action.id)
                held.update(keys)

    def _commit(self, admitted: list[Admitted], deferred: set[str], now: float) -> list[Grant]:
        """Take the exact units of every admitted, undeferred action, in FCFS order. An
        action one of whose pools cannot allocate is rolled back and stays queued."""
        grants: list[Grant] = []
        for adm in admitted:
            action = adm.entry.action
            if action.id in deferred:
                continue
            alloc: dict[str, Allocation] = {}
            order = list(adm.amounts)
            if len(order) > 1 and action.key in adm.amounts:  # key pool last
                order.remove(action.key)
                order.append(action.key)
            for p in order:
                got = self.pools[p].allocate(action, adm.amounts[p], adm.parts[p], now)
                if got is None:
                    break
                alloc[p] = got
            if len(alloc) != len(order):
                for p, got in alloc.items():
                    self.pools[p].rollback(action, got, now)
                continue
            grants.append(Grant(action, self._grant(adm.entry, alloc, now)))
        return grants

    def _note_ready(self, firsts: list[tuple[str, Entry]], now: float) -> None:
        """When could a refilling quota admit each pool's first waiter, now that this
        round's grants took their share?"""
        for p, entry in firsts:
            a = entry.action
            if a.id not in self._queue:
                continue
            amount = self.policy.key_amount(entry) if p == a.key else entry.feasible[p][0]
            t = self.pools[p].ready_at(a, amount, now)
            if t is None:
                continue
            if p not in entry.throttled_on:  # held back by a rate, window or token limit
                entry.throttled_on += (p,)
                self.pools[p].throttled_total += 1
            if self._ready_at is None or t < self._ready_at:
                self._ready_at = t

    def _block(self, entry: Entry, scrs: list[tuple[str, Scratch]], rnd: _Round) -> None:
        """``entry`` waits: later competitors on each of its pools wait behind it."""
        action = entry.action
        rnd.waiting.append(entry)
        for p, s in scrs:
            if p in rnd.saturated:
                continue
            if not s.blocked(action):
                rnd.firsts.append((p, entry))
            s.block(action)
            if s.saturated:
                rnd.saturated.add(p)

    def _grant(self, entry: Entry, alloc: dict[str, Allocation], now: float) -> Lease:
        action = entry.action
        self._dequeue(entry)
        lease = self.table.grant(action, alloc, now, action.ttl or self.lease_ttl)
        for p, a in alloc.items():
            mgr = self.pools[p]
            if mgr.shares_units:
                mgr.granted(a, lease.fencing_token)
        self.policy.on_grant(lease)
        self.counts["granted"] += 1
        return lease

    # ------------------------------------------------------------------ observation
    def snapshot(self, now: float) -> dict[str, Any]:
        pools = {}
        for name, mgr in self.pools.items():
            mgr.tick(now)
            snap = mgr.snapshot()
            snap["queued"] = self._queued_pools.get(name, 0)
            pools[name] = snap
        return {
            "pools": pools,
            "queued": len(self._queue),
            "leases": len(self.leases),
            "fencing": self.fencing,
            "policy": self.policy.name,
            "counts": dict(self.counts),
            "rounds": self.stats.rounds,
        }
