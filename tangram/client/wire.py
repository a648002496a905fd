"""Actions to JSON and lease JSON back to values, on the client side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tangram.spec import Action, Allocation, Amdahl


@dataclass(frozen=True, slots=True)
class RemoteLease:
    """A lease granted by a remote broker (the fields of the API's lease object)."""

    id: str
    action_id: str
    fencing_token: int
    allocation: dict[str, Allocation]
    dop: int
    restore: bool
    expires_at: float  # Unix time
    ttl: float

    @staticmethod
    def from_json(action_id: str, raw: Mapping[str, Any]) -> RemoteLease:
        return RemoteLease(
            id=raw["id"],
            action_id=action_id,
            fencing_token=int(raw["fencing_token"]),
            allocation={
                p: Allocation(int(a["amount"]), a.get("node"), tuple(a.get("units", ())))
                for p, a in raw["allocation"].items()
            },
            dop=int(raw["dop"]),
            restore=bool(raw["restore"]),
            expires_at=float(raw["expires_at"]),
            ttl=float(raw["ttl"]),
        )


def action_json(action: Action | Mapping[str, Any]) -> dict[str, Any]:
    """The request body for an action: an ``Action`` (as ``Action.build`` makes) or a
    mapping already in the wire format."""
    if not isinstance(action, Action):
        return dict(action)
    out: dict[str, Any] = {
        "trajectory": action.trajectory,
        "demands": {p: d.to_wire() for p, d in action.demands.items()},
        "task": action.task,
    }
    eff = action.efficiency
    if isinstance(eff, Amdahl):
        out["efficiency"] = {"amdahl": eff.parallel_fraction}
    elif eff is not None:
        out["efficiency"] = {"table": {str(m): e for m, e in eff.table}}
    for name in ("key", "duration", "service", "tokens", "ttl"):
        value = getattr(action, name)
        if value is not None:
            out[name] = value
    if action.memory_gb:
        out["memory_gb"] = action.memory_gb
    return out
