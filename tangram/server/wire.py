"""Between the wire and the broker: requests to actions, leases and records to JSON."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from tangram.server.models import ActionIn, AmdahlIn, ChoicesIn, RangeIn
from tangram.server.registry import Record
from tangram.spec import Action, Amdahl, Demand, Efficiency, Lease, parse_efficiency

JSON = "application/json"


def to_action(body: ActionIn, tenant: str | None, idempotency_key: str | None = None) -> Action:
    """The action the broker queues. With tenants, trajectory ids are namespaced by tenant
    so that one tenant's trajectories (pinned nodes, close) never touch another's."""
    demands: dict[str, Demand] = {}
    for pool, d in body.demands.items():
        if isinstance(d, int):
            demands[pool] = Demand(d, d)
        elif isinstance(d, RangeIn):
            demands[pool] = Demand(d.min, d.max)  # min > max: the core says so (422)
        else:
            assert isinstance(d, ChoicesIn)
            demands[pool] = Demand.of_choices(d.choices)
    eff: Efficiency | None = None
    if isinstance(body.efficiency, AmdahlIn):
        eff = Amdahl(body.efficiency.amdahl)
    elif body.efficiency is not None:
        eff = parse_efficiency({"table": body.efficiency.table})
    traj = body.trajectory if tenant is None else f"{tenant}/{body.trajectory}"
    return Action(
        trajectory=traj,
        demands=demands,
        task=body.task,
        key=body.key,
        duration=body.duration,
        efficiency=eff,
        service=body.service,
        tokens=body.tokens,
        memory_gb=body.memory_gb,
        ttl=body.ttl,
        tenant=tenant,
        idempotency_key=idempotency_key,
    )


def lease_json(lease: Lease, wall: float) -> dict[str, Any]:
    """``wall`` turns the broker's monotonic clock into Unix time for the client."""
    return {
        "id": lease.id,
        "fencing_token": lease.fencing_token,
        "allocation": {
            p: {"amount": a.amount, "node": a.node, "units": list(a.units)}
            for p, a in lease.allocation.items()
        },
        "dop": lease.dop,
        "restore": lease.restore,
        "expires_at": lease.expires_at + wall,
        "ttl": lease.ttl,
    }


def action_json(rec: Record, wall: float) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rec.action.id, "state": rec.state, "trajectory": rec.trajectory}
    if rec.lease is not None:
        out["lease"] = lease_json(rec.lease, wall)
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
