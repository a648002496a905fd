"""The one wire encoding of actions, allocations and leases: named fields, a version.

Everything that turns an action or a lease into plain data, or back, goes through here:
the journal's rows (tangram/journal.py), the Ray broker's grants (tangram/ray/actor.py
and client.py), the HTTP API's request bodies and lease objects (tangram/server/wire.py,
tangram/client/wire.py) and the simulator's trace lines (tangram/sim/trace.py).

``ACTION_FIELDS`` is the one list of what an action states, each field with its default
and how its value is written and read. Two typed mirrors of it stay, because a type
checker or a schema needs the names spelled out: the HTTP request model
(``tangram.server.models.ActionIn``) and ``Action.build``'s keywords;
tests/test_wire.py holds both to this list.

Bodies that only Tangram reads back (journal rows, Ray grants) carry ``"v": VERSION``,
and a reader refuses any other version with ``WireError`` instead of guessing at it.
The HTTP API is versioned by its path (``/v1``) and the trace format by its document
(docs/trace-format.md), both read by other programs, so neither carries a ``"v"``.

Trajectory ids are namespaced by tenant in the broker (``namespaced``) and shown to the
tenant without it (``local_trajectory``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tangram.errors import WireError
from tangram.spec import (
    Action,
    Allocation,
    Demand,
    Lease,
    Resident,
    efficiency_to_wire,
    parse_efficiency,
)

VERSION = 1


# --------------------------------------------------------------------------- tenants
def namespaced(tenant: str | None, trajectory: str) -> str:
    """The broker's id of a tenant's trajectory: tenants' ids never meet, so one tenant's
    trajectories (pinned nodes, close) never touch another's."""
    return trajectory if tenant is None else f"{tenant}/{trajectory}"


def local_trajectory(tenant: str | None, trajectory: str) -> str:
    """The inverse of ``namespaced``: the id as the tenant wrote it."""
    return trajectory if tenant is None else trajectory.removeprefix(f"{tenant}/")


# --------------------------------------------------------------------------- actions
def _same(value: Any) -> Any:
    return value


def _demands_out(demands: Mapping[str, Demand]) -> dict[str, Any]:
    return {p: d.to_wire() for p, d in demands.items()}


def _demands_in(raw: Mapping[str, Any]) -> dict[str, Demand]:
    return {str(p): Demand.parse(d, str(p)) for p, d in raw.items()}


@dataclass(frozen=True, slots=True)
class Field:
    """One field of an action: its name (the ``Action`` attribute and the JSON key),
    its default (left out of compact bodies), and how its value is written and read."""

    name: str
    default: Any = None
    encode: Callable[[Any], Any] = _same
    decode: Callable[[Any], Any] = _same
    required: bool = False


# What a client states about an action, in the order bodies list it.
ACTION_FIELDS: tuple[Field, ...] = (
    Field("trajectory", required=True),
    Field("demands", encode=_demands_out, decode=_demands_in, required=True),
    Field("task", "default"),
    Field("key"),
    Field("duration"),
    Field("efficiency", encode=efficiency_to_wire, decode=parse_efficiency),
    Field("service"),
    Field("tokens"),
    Field("memory_gb", 0.0),
    Field("ttl"),
)
# What the broker adds to an action and keeps with it (the journal), never taken from a
# client. ``submitted_at`` is on the broker's clock and is written apart, shifted.
RECORD_FIELDS: tuple[Field, ...] = (
    *ACTION_FIELDS,
    Field("tenant"),
    Field("idempotency_key"),
    Field("fingerprint"),
    Field("id", ""),
    Field("seq", 0),
)
_BY_NAME = {f.name: f for f in RECORD_FIELDS}


def action_fields(*names: str) -> tuple[Field, ...]:
    """The fields named, for a body that holds only some of them (a trace line)."""
    return tuple(_BY_NAME[n] for n in names)


def encode_fields(obj: Any, fields: Iterable[Field], *, compact: bool = True) -> dict[str, Any]:
    """``obj``'s fields by name; ``compact`` leaves out the optional ones at their default
    (a reader fills them in again)."""
    out: dict[str, Any] = {}
    for f in fields:
        value = getattr(obj, f.name)
        if compact and not f.required and value == f.default:
            continue
        out[f.name] = None if value is None else f.encode(value)
    return out


def decode_fields(raw: Mapping[str, Any], fields: Iterable[Field]) -> dict[str, Any]:
    """The values of ``fields`` in ``raw``, read back; absent optional fields are left
    out (their defaults apply), an absent required one is a ``WireError``."""
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in raw:
            value = raw[f.name]
            out[f.name] = None if value is None else f.decode(value)
        elif f.required:
            raise WireError(f"field {f.name!r} is required")
    return out


def action_request(action: Action) -> dict[str, Any]:
    """The HTTP request body of an action (what the client states; no tenant, no id)."""
    return encode_fields(action, ACTION_FIELDS)


def action_from_request(raw: Mapping[str, Any]) -> Action:
    """An action from a request body's fields (a validated ``ActionIn``, dumped)."""
    return Action(**decode_fields(raw, ACTION_FIELDS))


def action_record(action: Action, offset: float = 0.0) -> dict[str, Any]:
    """Everything the broker knows of an action, versioned (a journal row).
    ``offset`` turns the broker's clock into wall-clock time."""
    out = {"v": VERSION, **encode_fields(action, RECORD_FIELDS)}
    out["submitted_at"] = action.submitted_at + offset
    return out


def action_from_record(raw: Mapping[str, Any], offset: float = 0.0) -> Action:
    check_version(raw, "action")
    try:
        action = Action(**decode_fields(raw, RECORD_FIELDS))
        action.submitted_at = float(raw["submitted_at"]) - offset
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed action: {exc!r}") from None
    return action


# --------------------------------------------------------------------------- allocations
def resident_out(r: Resident) -> dict[str, Any]:
    out: dict[str, Any] = {"service": r.service, "k": r.k, "node": r.node, "start": r.start}
    if r.level:
        out["level"] = r.level
    return out


def resident_in(raw: Mapping[str, Any]) -> Resident:
    return Resident(
        str(raw["service"]),
        int(raw["k"]),
        str(raw["node"]),
        int(raw["start"]),
        int(raw.get("level", 0)),
    )


def allocation_out(a: Allocation, *, full: bool = True) -> dict[str, Any]:
    """An allocation by name. ``full=False`` is the HTTP API's form: amount, node and
    units only (what a client can use; restores and evictions are the broker's)."""
    out: dict[str, Any] = {"amount": a.amount, "node": a.node, "units": list(a.units)}
    if full:
        if a.restore:
            out["restore"] = True
        if a.evicts:
            out["evicts"] = [resident_out(r) for r in a.evicts]
        if a.pinned:
            out["pinned"] = True
        if a.epoch:
            out["epoch"] = a.epoch
        if a.restore_seconds:
            out["restore_seconds"] = a.restore_seconds
    return out


def allocation_in(raw: Mapping[str, Any]) -> Allocation:
    """Either form of ``allocation_out`` (what is absent is at its default)."""
    return Allocation(
        int(raw["amount"]),
        raw.get("node"),
        tuple(raw.get("units", ())),
        bool(raw.get("restore", False)),
        tuple(resident_in(r) for r in raw.get("evicts", ())),
        bool(raw.get("pinned", False)),
        int(raw.get("epoch", 0)),
        float(raw.get("restore_seconds", 0.0)),
    )


def _allocations_in(raw: Mapping[str, Any]) -> dict[str, Allocation]:
    return {str(p): allocation_in(a) for p, a in raw.items()}


# --------------------------------------------------------------------------- leases
def lease_record(lease: Lease, offset: float = 0.0) -> dict[str, Any]:
    """A lease's journal row without its action (the journal adds the action's record,
    encoded once when it was queued). Its deadline and TTL change with heartbeats, so the
    journal keeps them in columns of their own."""
    return {
        "v": VERSION,
        "id": lease.id,
        "fencing_token": lease.fencing_token,
        "granted_at": lease.granted_at + offset,
        "ttl": lease.ttl,
        "allocation": {p: allocation_out(a) for p, a in lease.allocation.items()},
    }


def lease_from_record(
    raw: Mapping[str, Any], action: Action, expires_at: float, ttl: float, offset: float = 0.0
) -> Lease:
    """The lease of a journal row; ``expires_at`` (on the broker's clock) and ``ttl`` come
    from the row's columns."""
    check_version(raw, "lease")
    try:
        return Lease(
            id=str(raw["id"]),
            action=action,
            fencing_token=int(raw["fencing_token"]),
            allocation=_allocations_in(raw["allocation"]),
            granted_at=float(raw["granted_at"]) - offset,
            expires_at=expires_at,
            ttl=ttl,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed lease: {exc!r}") from None


def grant_out(lease: Lease) -> dict[str, Any]:
    """A grant as the Ray broker sends it to the client that waits for it: the client
    rebuilds the lease around its own action, so the action is not sent, only the key
    pool the broker may have inferred. ``grant`` is the signed grant (an object, pickled
    by Ray) the executors check, or None."""
    return {
        "v": VERSION,
        "id": lease.id,
        "fencing_token": lease.fencing_token,
        "allocation": {p: allocation_out(a) for p, a in lease.allocation.items()},
        "ttl": lease.ttl,
        "key": lease.action.key,
        "grant": lease.grant,
    }


def lease_from_grant(raw: Mapping[str, Any], action: Action, now: float) -> Lease:
    """The lease a grant describes, around the client's own ``action``, on the client's
    clock (``now``: the broker's clock is not the client's)."""
    check_version(raw, "grant")
    try:
        ttl = float(raw["ttl"])
        action.key = raw["key"]
        lease = Lease(
            str(raw["id"]),
            action,
            int(raw["fencing_token"]),
            _allocations_in(raw["allocation"]),
            now,
            now + ttl,
            ttl,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed grant: {exc!r}") from None
    lease.grant = raw.get("grant")
    return lease


# The HTTP API's lease object, in the order it is written (docs/http-api.md).
HTTP_LEASE_FIELDS = ("id", "fencing_token", "allocation", "dop", "restore", "expires_at", "ttl")


def lease_http(lease: Lease, wall: float) -> dict[str, Any]:
    """The HTTP API's lease object; ``wall`` turns the broker's clock into Unix time."""
    return {
        "id": lease.id,
        "fencing_token": lease.fencing_token,
        "allocation": {p: allocation_out(a, full=False) for p, a in lease.allocation.items()},
        "dop": lease.dop,
        "restore": lease.restore,
        "expires_at": lease.expires_at + wall,
        "ttl": lease.ttl,
    }


def lease_from_http(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The values of an HTTP lease object, typed, keyed by ``HTTP_LEASE_FIELDS``."""
    return {
        "id": str(raw["id"]),
        "fencing_token": int(raw["fencing_token"]),
        "allocation": _allocations_in(raw["allocation"]),
        "dop": int(raw["dop"]),
        "restore": bool(raw["restore"]),
        "expires_at": float(raw["expires_at"]),
        "ttl": float(raw["ttl"]),
    }


# --------------------------------------------------------------------------- versions
def check_version(raw: Mapping[str, Any], what: str) -> None:
    """Refuse a body of another schema version than this Tangram writes."""
    v = raw.get("v")
    if v == VERSION:
        return
    if v is None:
        raise WireError(
            f"{what} without a schema version (written by a Tangram from before versioned "
            f"bodies); this one reads version {VERSION}"
        )
    raise WireError(f"{what} of schema version {v!r}; this Tangram reads version {VERSION}")
