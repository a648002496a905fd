"""The one wire module (tangram/wire.py) and the one error table (tangram/errors.py):
every field of an action and a lease survives each encoding, bodies of another version
are refused, and every error class comes back as itself over HTTP and over Ray."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import tangram
from tangram import errors, wire
from tangram.client import HttpClient, HttpError, ServerUnavailable, TooManyQueued
from tangram.client.errors import raise_for
from tangram.client.wire import RemoteLease, action_json
from tangram.config import parse_config
from tangram.core.state import Core
from tangram.errors import (
    CODES,
    TYPE_BASE,
    JournalError,
    QueueFull,
    TangramError,
    Unavailable,
    UnknownAction,
    UnknownLease,
    WireError,
)
from tangram.executors.fencing import SignedGrant
from tangram.journal import Journal
from tangram.server import LiveServer, create_app
from tangram.server.models import ActionIn, AllocationOut, LeaseOut
from tangram.server.problems import from_tangram
from tangram.server.wire import to_action
from tangram.sim.trace import ActionSpec, action_to_wire, parse_lines
from tangram.spec import (
    Action,
    Allocation,
    Amdahl,
    Demand,
    EfficiencyTable,
    Lease,
    Resident,
)


# --------------------------------------------------------------------------- actions
def full_action() -> Action:
    """An action with every field away from its default."""
    return Action(
        trajectory="team/traj-7",
        demands={
            "cpu": Demand.range(1, 16),
            "gpu": Demand.of_choices([1, 2, 4]),
            "api": Demand.fixed(3),
        },
        task="swe",
        key="cpu",
        duration=8.5,
        efficiency=EfficiencyTable(((1, 1.0), (4, 0.85))),
        service="rm",
        tokens=3000,
        memory_gb=4.5,
        ttl=30.0,
        tenant="team",
        idempotency_key="k-1",
        fingerprint="f" * 32,
        id="a42",
        submitted_at=12.25,
        seq=42,
    )


def fields_of(a: Action) -> dict[str, Any]:
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(Action)}


def test_an_action_record_round_trips_every_field() -> None:
    a = full_action()
    raw = orjson.loads(orjson.dumps(wire.action_record(a, offset=1000.0)))
    assert raw["v"] == wire.VERSION and raw["submitted_at"] == 1012.25  # wall clock
    assert fields_of(wire.action_from_record(raw, offset=1000.0)) == fields_of(a)
    # Every field the broker keeps is in the record, by name.
    assert {f.name for f in wire.RECORD_FIELDS} | {"submitted_at"} == set(fields_of(a))


def test_defaults_are_left_out_and_read_back() -> None:
    a = Action("t", {"api": Demand.fixed(1)}, efficiency=Amdahl(0.5))
    raw = wire.action_record(a)
    assert set(raw) == {"v", "trajectory", "demands", "efficiency", "submitted_at"}
    assert fields_of(wire.action_from_record(raw)) == fields_of(a)


def test_the_request_body_round_trips_through_the_http_schema() -> None:
    a = full_action()
    body = action_json(a)
    # What the client states, nothing the broker adds.
    assert set(body) == {f.name for f in wire.ACTION_FIELDS}
    assert body["efficiency"] == {"table": {"1": 1.0, "4": 0.85}}
    served = to_action(ActionIn.model_validate(body), "acme", "key-9")
    assert served.trajectory == "acme/team/traj-7" and served.tenant == "acme"
    assert served.idempotency_key == "key-9"
    assert wire.local_trajectory("acme", served.trajectory) == a.trajectory
    for f in wire.ACTION_FIELDS:
        if f.name != "trajectory":
            assert getattr(served, f.name) == getattr(a, f.name), f.name
    untenanted = to_action(ActionIn.model_validate(body), None)
    assert untenanted.trajectory == a.trajectory and untenanted.tenant is None


def test_the_typed_mirrors_list_the_same_fields() -> None:
    names = [f.name for f in wire.ACTION_FIELDS]
    assert list(ActionIn.model_fields) == names  # the HTTP schema
    build = list(inspect.signature(Action.build).parameters)
    assert build == [*names, "tenant"]  # Action.build's keywords, and the tenant


def test_namespacing_and_its_inverse() -> None:
    assert wire.namespaced(None, "t/1") == "t/1"
    assert wire.namespaced("acme", "t/1") == "acme/t/1"
    for tenant in (None, "acme"):
        assert wire.local_trajectory(tenant, wire.namespaced(tenant, "t/1")) == "t/1"


def test_a_trace_line_round_trips_and_old_lines_still_load() -> None:
    spec = ActionSpec(
        gap=1.5,
        demands={"cpu": Demand.range(1, 4), "gpu": Demand.of_choices([1, 2])},
        duration=8.0,
        key="cpu",
        efficiency=Amdahl(0.95),
        service="rm",
        tokens=7,
        label="tool",
    )
    head = '{"kind": "trajectory", "id": "t0"}'
    line = orjson.dumps(action_to_wire("t0", spec)).decode()
    assert "v" not in orjson.loads(line)  # the trace format is documented, not versioned
    (traj,) = parse_lines([head, line])
    assert traj.actions == [spec]
    # A line as the trace format documents it (and earlier versions wrote it).
    old = (
        '{"kind": "action", "trajectory": "t0", "gap": 3.2, "demands": {"cpu": {"min": 1, '
        '"max": 32}}, "duration": 40.0, "key": "cpu", "efficiency": {"amdahl": 0.95}}'
    )
    (traj,) = parse_lines([head, old])
    assert traj.actions[0].demands == {"cpu": Demand.range(1, 32)}
    assert traj.actions[0].efficiency == Amdahl(0.95)


# --------------------------------------------------------------------------- leases
def full_lease() -> Lease:
    alloc = {
        "cpu": Allocation(4, "n0", (8, 9, 10, 11), pinned=True),
        "gpu": Allocation(
            2,
            "g0",
            (2, 3),
            restore=True,
            evicts=(Resident("judge", 1, "g0", 2), Resident("rm", 2, "g0", 2)),
        ),
        "api": Allocation(1, None, ("s0",)),
    }
    lease = Lease("l41", full_action(), 41, alloc, granted_at=3.0, expires_at=33.0, ttl=30.0)
    lease.grant = SignedGrant("l41", 41, (("cpu", "n0", (8, 9, 10, 11)),), 1e9, b"sig")
    return lease


def test_a_lease_record_round_trips_every_field() -> None:
    lease = full_lease()
    raw = orjson.loads(orjson.dumps(wire.lease_record(lease, offset=1000.0)))
    assert raw["v"] == wire.VERSION and raw["granted_at"] == 1003.0
    back = wire.lease_from_record(raw, lease.action, expires_at=33.0, ttl=30.0, offset=1000.0)
    assert back.allocation == lease.allocation  # restore, evicts and pin included
    for name in ("id", "fencing_token", "granted_at", "expires_at", "ttl"):
        assert getattr(back, name) == getattr(lease, name), name


def test_a_ray_grant_round_trips_and_carries_the_signed_grant() -> None:
    lease = full_lease()
    raw = wire.grant_out(lease)
    assert raw["v"] == wire.VERSION and raw["grant"] is lease.grant
    mine = dataclasses.replace(lease.action, key=None)  # the client's copy, key inferred
    back = wire.lease_from_grant(raw, mine, now=500.0)
    assert back.action is mine and mine.key == "cpu"
    assert back.allocation == lease.allocation and back.grant is lease.grant
    assert (back.id, back.fencing_token, back.ttl) == ("l41", 41, 30.0)
    assert (back.granted_at, back.expires_at) == (500.0, 530.0)  # the client's clock


def test_the_http_lease_keeps_its_documented_fields() -> None:
    lease = full_lease()
    raw = orjson.loads(orjson.dumps(wire.lease_http(lease, wall=1000.0)))
    assert list(raw) == list(wire.HTTP_LEASE_FIELDS) == list(LeaseOut.model_fields)
    for alloc in raw["allocation"].values():
        assert list(alloc) == list(AllocationOut.model_fields)  # amount, node, units only
    assert raw["expires_at"] == 1033.0 and raw["dop"] == 4 and raw["restore"] is True
    remote = RemoteLease.from_json("a42", raw)
    assert remote.allocation == {
        p: Allocation(a.amount, a.node, a.units) for p, a in lease.allocation.items()
    }
    assert (remote.id, remote.action_id, remote.fencing_token) == ("l41", "a42", 41)
    assert (remote.dop, remote.restore, remote.expires_at, remote.ttl) == (4, True, 1033.0, 30.0)


@pytest.mark.parametrize("version", [None, 0, 2, "1"])
def test_bodies_of_another_version_are_refused(version: Any) -> None:
    lease = full_lease()
    bodies = {
        "action": wire.action_record(lease.action),
        "lease": wire.lease_record(lease),
        "grant": wire.grant_out(lease),
    }
    for what, body in bodies.items():
        body = {k: v for k, v in body.items() if k != "v"}
        if version is not None:
            body["v"] = version
        with pytest.raises(WireError, match=f"{what} (of schema version|without a schema)"):
            if what == "action":
                wire.action_from_record(body)
            elif what == "lease":
                wire.lease_from_record(body, lease.action, 0.0, 30.0)
            else:
                wire.lease_from_grant(body, lease.action, 0.0)


def test_a_journal_row_of_another_version_is_a_journal_error(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal(path)
    cfg = parse_config({"pools": {"api": {"kind": "quota", "concurrency": 2}}})
    c = Core(cfg.build_pools(), lease_ttl=30.0)
    c.observers.append(journal)
    c.submit(Action.build("t", {"api": 1}), 0.0)
    c.submit(Action.build("u", {"api": 2}), 0.0)  # waits: stays queued
    c.schedule(0.0)
    journal.flush()
    assert len(journal.load().leases) == 1 and len(journal.load().queued) == 1
    journal.close()
    for table in ("leases", "actions"):
        db = sqlite3.connect(path)
        (body,) = db.execute(f"SELECT body FROM {table}").fetchone()
        raw = orjson.loads(body)
        raw["v"] = 99
        db.execute(f"UPDATE {table} SET body = ?", (orjson.dumps(raw),))
        db.commit()
        db.close()
        again = Journal(path)
        with pytest.raises(JournalError, match="schema version 99; this Tangram reads version 1"):
            again.load()
        again.close()


# --------------------------------------------------------------------------- errors
def all_subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from all_subclasses(sub)


def _problem(exc: TangramError) -> tuple[int, dict[str, Any]]:
    p = from_tangram(exc)
    return p.status, orjson.loads(p.response().body)


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_each_error_travels_over_http_as_its_class(code: errors.Code) -> None:
    status, body = _problem(code.cls("boom"))
    assert status == body["status"] == code.status
    assert body["type"] == TYPE_BASE + code.kind and body["detail"] == "boom"
    # A kind names one class; a subclass may answer with its base's (HTTP clients
    # already know it) and then comes back as that base.
    expected = errors.class_of_kind(body["type"])
    assert expected is not None and issubclass(code.cls, expected)
    with pytest.raises(TangramError) as info:
        raise_for(status, body, retry_after=2.0)
    err = info.value
    assert isinstance(err, expected)
    if issubclass(expected, QueueFull):
        assert isinstance(err, TooManyQueued) and err.retry_after == 2.0
    elif issubclass(expected, Unavailable):
        assert isinstance(err, ServerUnavailable) and err.retry_after == 2.0
    elif expected is TangramError:
        assert isinstance(err, HttpError) and err.status == code.status
    else:
        assert type(err) is expected and str(err) == "boom"


@pytest.mark.parametrize("code", CODES, ids=lambda c: c.name)
def test_each_error_travels_over_ray_as_its_class(code: errors.Code) -> None:
    name = errors.name_of(code.cls("boom"))
    assert name == code.name
    err = errors.from_name(name, "boom")
    assert type(err) is code.cls and str(err) == "boom"


def test_the_table_names_every_class_once_and_shares_kinds_only_with_a_base() -> None:
    assert len({c.name for c in CODES}) == len(CODES)
    assert len({c.cls for c in CODES}) == len(CODES)
    owner: dict[str, type[TangramError]] = {}
    for c in CODES:
        first = owner.setdefault(c.kind, c.cls)
        assert issubclass(c.cls, first), (c.name, c.kind)
    assert errors.from_name("NoSuchError", "m").__class__ is TangramError
    assert errors.from_name(None, None).__class__ is TangramError


def test_every_error_class_that_crosses_a_boundary_is_in_the_table() -> None:
    for mod in pkgutil.walk_packages(tangram.__path__, "tangram."):
        if not mod.name.endswith(("__main__", ".cli", ".live_cli")):
            importlib.import_module(mod.name)
    listed = {c.cls for c in CODES}
    # Raised where they are caught, never sent: the HTTP client's own errors (they are
    # the answer, read), and the Ray client's and start-up's.
    local = {
        "HttpError",
        "Unauthorized",
        "TooManyQueued",
        "ServerUnavailable",
        "ExecutorError",
        "BrokerNotFound",
        "FencingKeyMismatch",
    }
    missing = [
        f"{c.__module__}.{c.__name__}"
        for c in all_subclasses(TangramError)
        if c not in listed and c.__name__ not in local
    ]
    assert missing == [], "add them to tangram/errors.py CODES"


def test_an_unknown_action_an_unknown_lease_and_an_unknown_route_stay_apart() -> None:
    def kind(k: str) -> dict[str, Any]:
        return {"type": TYPE_BASE + k, "detail": "no"}

    with pytest.raises(UnknownAction):
        raise_for(404, kind("unknown-action"))
    with pytest.raises(UnknownLease):
        raise_for(404, kind("unknown-lease"))
    with pytest.raises(HttpError) as info:
        raise_for(404, kind("not-found"))  # a route: neither
    assert not isinstance(info.value, (UnknownAction, UnknownLease))
    assert info.value.status == 404


async def test_the_live_server_answers_each_404_with_its_own_type() -> None:
    cfg = parse_config({"pools": {"api": {"kind": "quota", "concurrency": 1}}})
    with LiveServer(create_app(cfg)) as url:
        async with HttpClient(url) as client:
            with pytest.raises(UnknownAction, match="no action 'a999'"):
                await client.get("a999")
            with pytest.raises(UnknownLease, match="no lease 'l999'"):
                await client.heartbeat("l999")
            with pytest.raises(HttpError) as info:
                await client._call("GET", "/v1/nowhere")
            assert info.value.status == 404
            assert info.value.problem["type"] == TYPE_BASE + "not-found"
