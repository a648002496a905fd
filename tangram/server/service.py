"""The state one app serves: the broker, the action records, the tenants; and the
answers several endpoints share (long polls, lookups that hide other tenants' things)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tangram.broker import Broker
from tangram.config import Config, Tenant
from tangram.metrics import Metrics
from tangram.server.problems import Problem
from tangram.server.registry import Record, Registry
from tangram.server.wire import action_json, respond
from tangram.spec import Lease, UnknownAction, UnknownLease

SUBMIT = "/v1/actions"  # the path of a submit (POST)


class Service:
    """The state one app serves: the broker, the action records, the tenants."""

    def __init__(
        self,
        cfg: Config,
        tenants: Mapping[str, Tenant],
        broker: Broker | None = None,
        data_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.settings = cfg.server
        self.owns_broker = broker is None
        self.broker = Broker.from_config(cfg, data_dir=data_dir) if broker is None else broker
        self.registry = Registry()
        self.tenants = dict(tenants)
        # Each tenant's bound on queued actions is the core's to keep (so its refusals are
        # counted like every other); without tenants, one bound for everyone.
        bounds: dict[str | None, int] = {t.name: t.max_queued for t in self.tenants.values()}
        if not bounds:
            bounds[None] = self.settings.max_queued
        self.broker.core.bound_tenants(bounds)
        self._by_digest = {_digest(t.token): t for t in tenants.values()}
        # The broker's metrics (the /metrics route serves the same), for the refusals the
        # HTTP layer makes before an action reaches the core.
        self.metrics = Metrics.of(self.broker.core, self.broker.clock)
        # The broker runs on the monotonic clock; clients want Unix time.
        self.wall = time.time() - self.broker.clock()
        self.broker.subscribe(self._on_event)

    def adopt_restored(self) -> None:
        """Records for what the broker restored from its journal, so clients find their
        actions and leases under the same ids after a restart: leases live or ended (a
        retried release of an ended one is answered as released, not as unknown) and
        queued actions. Runs on the broker's event loop, before the first request."""
        loop = asyncio.get_running_loop()
        for lease in (*self.broker.ended_restored, *self.broker.restored):
            if lease.action.id not in self.registry.actions:
                self.registry.adopt(lease, loop.create_future())
        for action in self.broker.requeued:
            fut = self.broker.follow(action.id)
            if fut is not None and action.id not in self.registry.actions:
                self.registry.adopt_queued(action, fut)

    def _on_event(self, kind: str, obj: Any) -> None:
        if kind in ("release", "expire") and isinstance(obj, Lease):
            rec = self.registry.by_lease.get(obj.id)
            if rec is not None:
                self.registry.end(rec)

    def tenant(self, request: Request) -> str | None:
        """The caller's tenant from its bearer token; None when no tenants are set up."""
        if not self._by_digest:
            return None
        return self._tenant_of(request.headers.get("authorization", ""))

    def _tenant_of(self, auth: str) -> str:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(
                401,
                "this server has tenants: send 'Authorization: Bearer <your token>'",
                headers={"WWW-Authenticate": 'Bearer realm="tangram"'},
            )
        # Look the token up by its digest so the comparison does not leak its prefix.
        found = self._by_digest.get(_digest(token.strip()))
        if found is None:
            raise Problem(
                401,
                "the bearer token is not one of this server's tenants' tokens",
                headers={"WWW-Authenticate": 'Bearer realm="tangram", error="invalid_token"'},
            )
        return found.name

    def refuse(self, reason: str, tenant: str | None) -> None:
        """Count a submit the HTTP layer refused (the core counts its own refusals)."""
        self.metrics.refuse(reason, tenant)

    def too_large(self, scope: Any) -> None:
        """A request answered 413 for its body (limits.BodyLimit): a refused submit, if
        it was one, counted under its tenant when its token names one."""
        if scope.get("method") != "POST" or scope.get("path") != SUBMIT:
            return
        tenant = None
        if self._by_digest:
            auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            try:
                tenant = self._tenant_of(auth.decode("latin-1"))
            except Problem:
                tenant = None
        self.refuse("too_large", tenant)

    async def answer(
        self,
        rec: Record,
        wait: float,
        queued_status: int,
        *,
        durable: bool = False,
        fresh: bool = False,
    ) -> Response:
        """The record as JSON, after holding the request up to ``wait`` s while queued.
        ``durable``: the answer acknowledges a change, so it waits until the journal has
        it (a grant is durable before its future resolves; a queued action may not be).
        ``fresh``: the action was submitted by this request, which kicked a scheduling
        round; the answer says what that round decided (granted, or still queued)."""
        fut = rec.future
        if fresh and not fut.done():
            # The round runs on the next loop iteration (Broker._kick: call_soon), before
            # this task resumes, whatever else submitted meanwhile: the submits of one
            # iteration still share one round. A grant is durable before it resolves.
            await asyncio.sleep(0)
        if wait > 0 and not fut.done():
            # asyncio.wait never cancels the future: the action stays queued after a
            # timeout (cancelling it would make the broker drop a racing grant).
            await asyncio.wait((fut,), timeout=min(wait, self.settings.max_wait_seconds))
        if durable and not fut.done():
            await self.broker.sync()
        self.registry.settle(rec)
        status = queued_status if rec.state == "queued" else 200
        waiting = self.broker.why_waiting(rec.action.id) if rec.state == "queued" else None
        return respond(action_json(rec, self.wall, waiting), status)

    def record(self, action_id: str, tenant: str | None) -> Record:
        rec = self.registry.get(action_id, tenant)
        if rec is None:
            raise UnknownAction(f"no action {action_id!r}" + _for(tenant))
        return rec

    def check_holder(self, rec: Record, fencing_token: int | None) -> None:
        """A caller that names the lease's fencing token must name the right one: a
        stale holder's call changes nothing. (The lease id itself is random and only
        ever sent to the holder.)"""
        lease = rec.lease
        if fencing_token is not None and lease is not None and lease.fencing_token != fencing_token:
            raise Problem(
                409,
                f"lease {lease.id!r} has another fencing token than {fencing_token}: this "
                "caller does not hold it; nothing was changed",
                kind="not-holder",
            )

    def lease_record(self, lease_id: str, tenant: str | None) -> Record:
        rec = self.registry.by_lease_id(lease_id, tenant)
        if rec is None:
            raise UnknownLease(f"no lease {lease_id!r}" + _for(tenant))
        return rec


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _for(tenant: str | None) -> str:
    return f" for tenant {tenant!r}" if tenant is not None else ""
