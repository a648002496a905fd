"""The lease table: every lease the core granted, and the one place a lease changes
state.

| from | event | to |
|---|---|---|
| (a queued action) | ``grant`` | granted |
| (a restart) | ``adopt`` | granted |
| granted | ``extend`` (a heartbeat) | granted, with a new deadline |
| granted | ``close(..., "released")`` | released |
| granted | its deadline passes (``due``) | expired |
| (a restart) | ``remember`` | released or expired |

Deadlines are the table's own (``deadline``): a caller that changes ``expires_at`` on a
``Lease`` it was handed changes what it reads, not when the lease expires. The table
also keeps the fencing counter (it only grows) and the last ``ENDED_KEPT`` ended leases,
so a late release or heartbeat gets a precise answer. It never touches units: the core
takes them back from the managers when a lease ends.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable

from tangram.spec import (
    Action,
    Allocation,
    InvalidAction,
    Lease,
    LeaseExpired,
    LeaseReleased,
    UnknownLease,
)

ENDED_KEPT = 100_000  # ended leases remembered for idempotent release and clear errors


class LeaseTable:
    def __init__(self, ids: Callable[[str], str], prefix: str = "") -> None:
        self._ids = ids  # kind -> a new id ("l" for leases)
        self._prefix = prefix
        self.live: dict[str, Lease] = {}
        self.of_action: dict[str, str] = {}  # action id -> id of its live lease
        self._deadline: dict[str, float] = {}
        # (deadline, lease id); entries of released or extended leases stay until popped.
        self._heap: list[tuple[float, str]] = []
        # lease id -> (state, expires_at, ended_at) of the last ENDED_KEPT ended leases.
        # Plain tuples of atomic values: the garbage collector need not track them.
        self.ended: OrderedDict[str, tuple[str, float, float]] = OrderedDict()
        self.fencing = 0

    # ------------------------------------------------------------------ beginnings
    def grant(
        self, action: Action, allocation: dict[str, Allocation], now: float, ttl: float
    ) -> Lease:
        self.fencing += 1
        lid = self._prefix + self._ids("l")
        at = now + ttl
        lease = Lease(lid, action, self.fencing, allocation, now, at, ttl)
        # As _add, inline: this runs on every grant.
        self.live[lid] = lease
        self.of_action[action.id] = lid
        self._deadline[lid] = at
        heapq.heappush(self._heap, (at, lid))
        return lease

    def adopt(self, lease: Lease) -> None:
        """A lease recorded before a restart, granted again with its id, token and
        deadline; the counter continues above its token."""
        if lease.id in self.live or lease.action.id in self.of_action:
            raise ValueError(f"lease {lease.id!r} is already live")
        self.fencing = max(self.fencing, lease.fencing_token)
        lease.state = "granted"
        self._add(lease)

    def remember(self, lease: Lease) -> None:
        """An ended lease recorded before a restart."""
        assert lease.state in ("released", "expired") and lease.ended_at is not None
        self.fencing = max(self.fencing, lease.fencing_token)
        self._ended(lease.id, lease.state, lease.expires_at, lease.ended_at)

    def _add(self, lease: Lease) -> None:
        self.live[lease.id] = lease
        self.of_action[lease.action.id] = lease.id
        self._deadline[lease.id] = lease.expires_at
        heapq.heappush(self._heap, (lease.expires_at, lease.id))

    # ------------------------------------------------------------------ queries
    def state(self, lease_id: str) -> str:
        """granted, released or expired; UnknownLease if never seen (or long forgotten)."""
        if lease_id in self.live:
            return "granted"
        ended = self.ended.get(lease_id)
        if ended is None:
            raise UnknownLease(f"no lease {lease_id!r}")
        return ended[0]

    def deadline(self, lease_id: str) -> float:
        return self._deadline[lease_id]

    def ended_error(self, lease_id: str, releasing: bool, now: float) -> Exception | None:
        """Why a lease that is not live cannot be released or heartbeated: UnknownLease,
        LeaseExpired, or (for a heartbeat) LeaseReleased; None for releasing a released
        lease, which is not an error."""
        ended = self.ended.get(lease_id)
        if ended is None:
            return UnknownLease(f"no lease {lease_id!r}")
        state, expires_at, _ = ended
        if state == "expired":
            return expired(lease_id, now - expires_at)
        return None if releasing else LeaseReleased(f"lease {lease_id!r} was already released")

    def next_deadline(self) -> float | None:
        heap, deadline = self._heap, self._deadline
        while heap and deadline.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # released, or extended since
        return heap[0][0] if heap else None

    # ------------------------------------------------------------------ changes
    def extend(self, lease: Lease, now: float, ttl: float | None) -> float:
        """A heartbeat: the lease's deadline is ``ttl`` (or its own TTL) from now."""
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
            raise InvalidAction(f"ttl must be a positive number of seconds, got {ttl}")
        lease.ttl = ttl or lease.ttl
        at = lease.expires_at = now + lease.ttl
        self._deadline[lease.id] = at
        heapq.heappush(self._heap, (at, lease.id))
        return at

    def close(self, lease: Lease, state: str, now: float) -> None:
        """The lease ended: ``state`` is released or expired."""
        lid = lease.id
        del self.live[lid]
        self.of_action.pop(lease.action.id, None)
        lease.expires_at = self._deadline.pop(lid)
        lease.state = state
        lease.ended_at = now
        ended = self.ended  # as _ended, inline: this runs on every release
        ended[lid] = (state, lease.expires_at, now)
        if len(ended) > ENDED_KEPT:
            ended.popitem(last=False)
        if len(self._heap) > 2 * len(self.live) + 4096:
            # Released leases leave their entries behind until their deadline; at high
            # rates that is millions of them. Rebuild from the live leases instead.
            self._heap = [(self._deadline[i], i) for i in self.live]
            heapq.heapify(self._heap)

    def due(self, now: float) -> list[Lease]:
        """The live leases whose deadline is ``now`` or earlier (still live: the caller
        closes them)."""
        out: dict[str, Lease] = {}  # a heartbeat to the same deadline left two entries
        heap, deadline = self._heap, self._deadline
        while heap and heap[0][0] <= now:
            at, lid = heapq.heappop(heap)
            if deadline.get(lid) == at:
                out[lid] = self.live[lid]
        return list(out.values())

    def _ended(self, lease_id: str, state: str, expires_at: float, at: float) -> None:
        ended = self.ended
        ended[lease_id] = (state, expires_at, at)
        if len(ended) > ENDED_KEPT:
            ended.popitem(last=False)


def expired(lease_id: str, ago: float) -> LeaseExpired:
    """The error for a lease past its deadline. It says how long ago in seconds: the
    deadline itself is on the broker's clock (its event loop's), which means nothing to a
    client."""
    return LeaseExpired(
        f"lease {lease_id!r} expired {max(0.0, ago):.1f} s ago (no heartbeat within its "
        "TTL); its units were taken back"
    )
