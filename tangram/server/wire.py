"""Between the wire and the broker: requests to actions, leases and records to JSON."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from tangram import wire
from tangram.server.models import ActionIn
from tangram.server.registry import Record
from tangram.spec import Action, Lease

JSON = "application/json"


def to_action(body: ActionIn, tenant: str | None, idempotency_key: str | None = None) -> Action:
    """The action the broker queues. With tenants, trajectory ids are namespaced by tenant
    so that one tenant's trajectories (pinned nodes, close) never touch another's."""
    action = wire.action_from_request(body.model_dump())
    action.trajectory = wire.namespaced(tenant, action.trajectory)
    action.tenant = tenant
    action.idempotency_key = idempotency_key
    return action


def lease_json(lease: Lease, wall: float) -> dict[str, Any]:
    """``wall`` turns the broker's monotonic clock into Unix time for the client."""
    return wire.lease_http(lease, wall)


def action_json(rec: Record, wall: float, waiting: dict[str, Any] | None = None) -> dict[str, Any]:
    """``waiting``: why a queued action waits (``Broker.why_waiting``), its ``ready_at``
    on the broker's clock (turned into Unix time here)."""
    out: dict[str, Any] = {"id": rec.action.id, "state": rec.state, "trajectory": rec.trajectory}
    if rec.lease is not None:
        out["lease"] = lease_json(rec.lease, wall)
    if waiting is not None and rec.state == "queued":
        if "ready_at" in waiting:
            waiting = {**waiting, "ready_at": waiting["ready_at"] + wall}
        out["waiting"] = waiting
    return out


def lease_state_json(rec: Record, wall: float) -> dict[str, Any]:
    lease = rec.lease
    assert lease is not None
    return {
        "id": lease.id,
        "action": rec.action.id,
        "state": rec.state,
        "expires_at": lease.expires_at + wall,
        "ttl": lease.ttl,
    }


def respond(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, media_type=JSON)
