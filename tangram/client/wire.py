"""Actions to JSON and lease JSON back to values, on the client side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tangram import wire
from tangram.spec import Action, Allocation


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
        return RemoteLease(action_id=action_id, **wire.lease_from_http(raw))


def action_json(action: Action | Mapping[str, Any]) -> dict[str, Any]:
    """The request body for an action: an ``Action`` (as ``Action.build`` makes) or a
    mapping already in the wire format."""
    if not isinstance(action, Action):
        return dict(action)
    return wire.action_request(action)
