"""What the HTTP API remembers per action: its tenant, its lease, its idempotency key.

The broker only knows queued actions and leases; a client asks about an *action* (is it
still queued? what did it get? did it end?) and may retry a submit. A record lives from
submit until a while after its action ends: the last ``kept`` ended records are kept for
late GETs and retried submits, then forgotten (their ids then answer 404).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from tangram import wire
from tangram.spec import Action, Lease

KEPT = 100_000


@dataclass(slots=True, eq=False)
class Record:
    action: Action
    tenant: str | None
    trajectory: str  # as the client wrote it (the broker's is namespaced by tenant)
    future: asyncio.Future[Lease]
    idem: tuple[str | None, str] | None = None
    lease: Lease | None = None
    cancelled: bool = False
    ended: bool = False

    @property
    def state(self) -> str:
        lease = self.lease
        if lease is None:
            return "cancelled" if self.cancelled else "queued"
        return lease.state  # granted, released or expired


class Registry:
    """Records by action id and by lease id, and idempotency keys."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self.actions: dict[str, Record] = {}
        self.by_lease: dict[str, Record] = {}
        self.by_key: dict[tuple[str | None, str], Record] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()

    def add(self, rec: Record) -> None:
        self.actions[rec.action.id] = rec
        if rec.idem is not None:
            self.by_key[rec.idem] = rec
        rec.future.add_done_callback(lambda _: self.settle(rec))

    def settle(self, rec: Record) -> None:
        """Bring the record up to date with its future (idempotent: it runs from the
        future's callback and from any reader that gets there first)."""
        fut = rec.future
        if rec.lease is not None or rec.cancelled or not fut.done():
            return
        if fut.cancelled() or fut.exception() is not None:  # also marks it retrieved
            rec.cancelled = True
            self.end(rec)
            return
        lease = fut.result()
        rec.lease = lease
        self.by_lease[lease.id] = rec
        if lease.state != "granted":  # ended before anyone looked (an expiry raced)
            self.end(rec)

    def end(self, rec: Record) -> None:
        """The action is over (released, expired, cancelled): forget it after ``kept``
        newer ones."""
        if rec.ended:
            return
        rec.ended = True
        ended = self._ended
        ended[rec.action.id] = None
        while len(ended) > self.kept:
            old_id, _ = ended.popitem(last=False)
            old = self.actions.pop(old_id, None)
            if old is None:
                continue
            if old.lease is not None:
                self.by_lease.pop(old.lease.id, None)
            if old.idem is not None and self.by_key.get(old.idem) is old:
                del self.by_key[old.idem]

    def get(self, action_id: str, tenant: str | None) -> Record | None:
        """The record if it exists and belongs to ``tenant`` (another tenant's actions
        are as absent)."""
        rec = self.actions.get(action_id)
        if rec is None or rec.tenant != tenant:
            return None
        self.settle(rec)
        return rec

    def adopt(self, lease: Lease, future: asyncio.Future[Lease]) -> Record:
        """A record for a lease restored from the journal after a restart, so its
        holder can heartbeat and release it, and a retried submit with its idempotency
        key gets it back."""
        a = lease.action
        traj = wire.local_trajectory(a.tenant, a.trajectory)
        future.set_result(lease)
        idem = (a.tenant, a.idempotency_key) if a.idempotency_key is not None else None
        rec = Record(a, a.tenant, traj, future, idem, lease=lease)
        self.actions[a.id] = rec
        self.by_lease[lease.id] = rec
        if idem is not None:  # a retried submit finds the lease it was granted
            self.by_key[idem] = rec
        if lease.state != "granted":
            self.end(rec)
        return rec

    def adopt_queued(self, action: Action, future: asyncio.Future[Lease]) -> Record:
        """A record for an action that was queued before a restart: its client's polls
        find it under the same id, and a retried submit under its key."""
        traj = wire.local_trajectory(action.tenant, action.trajectory)
        idem = (action.tenant, action.idempotency_key) if action.idempotency_key else None
        rec = Record(action, action.tenant, traj, future, idem)
        self.add(rec)
        return rec

    def by_lease_id(self, lease_id: str, tenant: str | None) -> Record | None:
        rec = self.by_lease.get(lease_id)
        if rec is None or rec.tenant != tenant:
            return None
        return rec
