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
from tangram.server.problems import Problem
from tangram.server.registry import Record, Registry
from tangram.server.wire import action_json, respond
from tangram.spec import Lease


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
        self._by_digest = {_digest(t.token): t for t in tenants.values()}
        # The broker runs on the monotonic clock; clients want Unix time.
        self.wall = time.time() - self.broker.clock()
        self.broker.subscribe(self._on_event)

    def _on_event(self, kind: str, obj: Any) -> None:
        if kind in ("release", "expire") and isinstance(obj, Lease):
            rec = self.registry.by_lease.get(obj.id)
            if rec is not None:
                self.registry.end(rec)

    def tenant(self, request: Request) -> str | None:
        """The caller's tenant from its bearer token; None when no tenants are set up."""
        if not self._by_digest:
            return None
        auth = request.headers.get("authorization", "")
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

    def bound(self, tenant: str | None) -> int:
        t = self.tenants.get(tenant) if tenant is not None else None
        return t.max_queued if t is not None else self.settings.max_queued

    async def answer(self, rec: Record, wait: float, queued_status: int) -> Response:
        """The record as JSON, after holding the request up to ``wait`` s while queued."""
        fut = rec.future
        if wait > 0 and not fut.done():
            # asyncio.wait never cancels the future: the action stays queued after a
            # timeout (cancelling it would make the broker drop a racing grant).
            await asyncio.wait((fut,), timeout=min(wait, self.settings.max_wait_seconds))
        self.registry.settle(rec)
        status = queued_status if rec.state == "queued" else 200
        return respond(action_json(rec, self.wall), status)

    def record(self, action_id: str, tenant: str | None) -> Record:
        rec = self.registry.get(action_id, tenant)
        if rec is None:
            raise Problem(404, f"no action {action_id!r}" + _for(tenant))
        return rec

    def lease_record(self, lease_id: str, tenant: str | None) -> Record:
        rec = self.registry.by_lease_id(lease_id, tenant)
        if rec is None:
            raise Problem(404, f"no lease {lease_id!r}" + _for(tenant))
        return rec


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _for(tenant: str | None) -> str:
    return f" for tenant {tenant!r}" if tenant is not None else ""
