"""The lease journal: what a broker granted survives its crash, exactly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tangram.config import parse_config
from tangram.core.managers.cpu import CpuManager
from tangram.core.state import Core
from tangram.journal import Journal
from tangram.spec import Action, LeaseExpired

POOLS: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"count": 2, "cores": 4, "numa": 2, "memory_gb": 8}]},
    "gpu": {
        "kind": "gpu",
        "nodes": [{"name": "g", "gpus": 4, "memory_gb": 10}],
        "services": {"rm": {"memory_gb": 8, "restore_seconds": 1.0, "parallelism": [1, 2]}},
    },
    "api": {"kind": "quota", "concurrency": 3},
}


def core() -> Core:
    return Core(parse_config({"pools": POOLS}).build_pools(), lease_ttl=30.0)


def held_units(c: Core) -> set[tuple[str, Any, Any]]:
    out = set()
    for lease in c.leases.values():
        for pool, alloc in lease.allocation.items():
            out.update((pool, alloc.node, u) for u in alloc.units)
    return out


def test_a_restarted_core_holds_exactly_the_journalled_leases(tmp_path: Path) -> None:
    mono = [100.0]
    j = Journal(tmp_path / "j.sqlite3", mono=lambda: mono[0], wall=lambda: 5000.0 + mono[0])
    a = core()
    actions = [
        Action.build("t0", {"cpu": {"min": 1, "max": 3}}, memory_gb=2, duration=2.0,
                     efficiency={"amdahl": 0.9}),
        Action.build("t1", {"cpu": 2, "api": 1}, task="search"),
        Action.build("t2", {"gpu": {"choices": [1, 2]}}, service="rm"),
        Action.build("t3", {"api": 1}, tokens=10),
    ]  # fmt: skip
    for act in actions:
        a.submit(act, 100.0)
    # In the order submitted (a round grants the shortest expected first).
    grants = sorted(a.schedule(100.0), key=lambda g: g.action.seq)
    assert len(grants) == 4
    for g in grants:
        j.on_grant(g.lease, 0.0)
    j.flush()
    gone = grants[3].lease
    a.release(gone.id, 101.0)
    j.end(gone)
    beat = grants[0].lease
    a.heartbeat(beat.id, 110.0)
    j.on_heartbeat(beat, 0.0)
    j.flush()
    before = held_units(a)
    top = a.fencing

    # The process dies; a new one starts later on a monotonic clock with another origin.
    mono[0] = 7.0
    j2 = Journal(tmp_path / "j.sqlite3", mono=lambda: mono[0], wall=lambda: 5000.0 + 120.0)
    b = core()
    restored = j2.restore_into(b, 7.0).leases
    assert {x.id for x in restored} == {g.lease.id for g in grants[:3]}
    assert held_units(b) == before
    by_id = {x.id: x for x in restored}
    # Deadlines carried across clocks: the heartbeat at 110 gave 140 (wall 5140),
    # which is 20 s after the restart (wall 5120 = mono 7).
    assert by_id[beat.id].expires_at == pytest.approx(7.0 + 20.0)
    assert by_id[beat.id].action.efficiency == actions[0].efficiency
    cpu = b.pools["cpu"]
    assert isinstance(cpu, CpuManager)
    assert cpu.pins["t0"][1] == 2  # the trajectory's memory is reserved again

    # New grants never touch restored units, and their fencing tokens are higher.
    for i in range(6):
        b.submit(Action.build(f"n{i}", {"cpu": 1}), 8.0)
    new = b.schedule(8.0)
    assert new and all(g.lease.fencing_token > top for g in new)
    assert len(held_units(b)) == len(before) + len(new)
    # Restored leases release normally; an action id is never reused.
    b.release(grants[1].lease.id, 9.0)
    assert all(g.action.id not in {x.action.id for x in restored} for g in new)


def test_restored_leases_expire_on_their_deadline(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3", mono=lambda: 0.0, wall=lambda: 1000.0)
    a = core()
    a.submit(Action.build("t", {"cpu": 1}, ttl=5.0), 0.0)
    (g,) = a.schedule(0.0)
    j.on_grant(g.lease, 0.0)
    j.flush()
    j2 = Journal(tmp_path / "j.sqlite3", mono=lambda: 0.0, wall=lambda: 1003.0)
    b = core()
    (lease,) = j2.restore_into(b, 0.0).leases
    assert lease.expires_at == pytest.approx(2.0)
    assert b.expire(2.0)[0].lease.id == g.lease.id
    with pytest.raises(LeaseExpired):
        b.release(g.lease.id, 2.5)


def test_a_lease_whose_units_left_the_configuration_is_dropped(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    a = core()
    a.submit(Action.build("t", {"gpu": 1}), 0.0)
    (g,) = a.schedule(0.0)
    j.on_grant(g.lease, 0.0)
    j.flush()
    smaller = {**POOLS, "gpu": {"kind": "gpu", "nodes": [{"name": "other", "gpus": 2}]}}
    b = Core(parse_config({"pools": smaller}).build_pools())
    assert Journal(tmp_path / "j.sqlite3").restore_into(b, 0.0).leases == []
    assert Journal(tmp_path / "j.sqlite3").load().leases == []
    assert b.fencing >= a.fencing  # the counter still continues above it


def test_one_commit_per_flush_however_many_grants(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite3")
    a = Core(parse_config({"pools": {"api": {"kind": "quota", "concurrency": 100}}}).build_pools())
    for i in range(50):
        a.submit(Action.build(f"t{i}", {"api": 1}), 0.0)
    for g in a.schedule(0.0):
        j.on_grant(g.lease, 0.0)
    j.flush()
    assert j.commits == 1
    assert len(j.load().leases) == 50


async def test_a_broker_acknowledges_a_lease_only_once_it_is_durable(tmp_path: Path) -> None:
    from tangram.broker import Broker

    cfg = parse_config({"pools": POOLS})
    broker = Broker.from_config(cfg, data_dir=tmp_path)
    lease = await broker.acquire(Action.build("t", {"cpu": 2}))
    # Another reader (as a restarted process would be) already sees it.
    assert [x.id for x in Journal(tmp_path / "journal.sqlite3").load().leases] == [lease.id]
    held = await broker.acquire(Action.build("u", {"gpu": 1}, service="rm"))
    broker.release(lease.id)
    broker.heartbeat(held.id, ttl=500.0)
    await asyncio.sleep(0)  # the round that makes the release and heartbeat durable
    # The process "dies" here (no close). A new broker on the same directory:
    again = Broker.from_config(cfg, data_dir=tmp_path)
    assert [x.id for x in again.restored] == [held.id]
    assert again.restored[0].expires_at == pytest.approx(again.clock() + 500.0, abs=1.0)
    fresh = await again.acquire(Action.build("v", {"gpu": 1}, service="rm"))
    assert fresh.fencing_token > held.fencing_token
    assert fresh.allocation["gpu"].units != held.allocation["gpu"].units
    assert again.release(held.id) is not None  # a restored lease releases like any other
