"""Leases in the sans-I/O core: fencing, release, heartbeat, expiry, cancel, accounting."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from tangram.spec import (
    Action,
    InvalidAction,
    LeaseExpired,
    LeaseReleased,
    UnknownLease,
)

CPU4: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 4, "memory_gb": 16}]}
}


def run(traj: str = "t", n: int = 1, **kw: Any) -> Action:
    return Action.build(traj, {"cpu": n}, **kw)


def grant_one(core, now: float, **kw: Any):
    core.submit(run(**kw), now)
    (g,) = core.schedule(now)
    return g.lease


def in_use(core, now: float) -> int:
    return core.snapshot(now)["pools"]["cpu"]["in_use"]


# --------------------------------------------------------------------------- fencing


def test_fencing_tokens_strictly_increase(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    tokens, ids = [], set()
    t = 0.0
    for i in range(12):
        core.submit(run(f"t{i}", 1 + i % 2), t)
        for g in core.schedule(t):
            tokens.append(g.lease.fencing_token)
            ids.add(g.lease.id)
        t += 1.0
        if i % 3 == 0:
            core.expire(t + 100.0)  # whatever is active expires
            t += 100.0
        elif core.leases:
            core.release(next(iter(core.leases)), t)
    assert len(tokens) >= 10
    assert all(b > a for a, b in itertools.pairwise(tokens))
    assert len(ids) == len(tokens)
    assert core.fencing == tokens[-1]


# --------------------------------------------------------------------------- release


def test_release_returns_the_units_and_is_idempotent(make_core):
    core = make_core(CPU4)
    lease = grant_one(core, 0.0, n=3)
    assert in_use(core, 0.0) == 3
    core.release(lease.id, 1.0, outcome="ok")
    assert lease.state == "released" and lease.outcome == "ok"
    core.release(lease.id, 2.0, outcome="error")  # no error
    assert lease.outcome == "ok" and lease.ended_at == 1.0  # the second one changed nothing
    assert core.counts["released"] == 1
    snap = core.snapshot(2.0)["pools"]["cpu"]
    assert snap["in_use"] == 0
    assert snap["topology"]["n"]["free_cores"] == 4  # not freed twice


def test_release_after_expiry_raises_lease_expired(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    lease = grant_one(core, 0.0, n=2)
    assert core.expire(9.99) == []
    (ev,) = core.expire(10.0)
    assert ev.lease is lease and lease.state == "expired"
    assert in_use(core, 10.0) == 0  # units taken back at expiry
    with pytest.raises(LeaseExpired) as err:
        core.release(lease.id, 11.0)
    assert "expired 1.0 s ago" in str(err.value)  # the broker's clock means nothing to a client
    assert "TTL" in str(err.value) and "taken back" in str(err.value)
    assert core.counts["expired"] == 1 and core.counts["released"] == 0


def test_release_of_an_unknown_lease_raises(make_core):
    core = make_core(CPU4)
    with pytest.raises(UnknownLease, match="no lease 'nope'"):
        core.release("nope", 0.0)


# --------------------------------------------------------------------------- heartbeat


def test_heartbeat_extends_the_ttl(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    lease = grant_one(core, 0.0)
    assert lease.expires_at == 10.0
    assert core.heartbeat(lease.id, 5.0) == 15.0
    assert core.expire(10.0) == []  # the old deadline does nothing
    assert lease.state == "granted" and lease.id in core.leases
    assert core.next_wakeup() == 15.0
    assert core.expire(14.99) == []
    (ev,) = core.expire(15.0)
    assert ev.lease is lease and lease.state == "expired"


def test_heartbeat_may_change_the_ttl(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    lease = grant_one(core, 0.0)
    assert core.heartbeat(lease.id, 5.0, ttl=30.0) == 35.0
    assert lease.ttl == 30.0
    assert core.heartbeat(lease.id, 10.0) == 40.0  # the new TTL sticks
    with pytest.raises(InvalidAction, match="ttl must be a positive number"):
        core.heartbeat(lease.id, 11.0, ttl=-1.0)
    assert lease.expires_at == 40.0


def test_action_ttl_overrides_the_default(make_core):
    core = make_core(CPU4, lease_ttl=60.0)
    lease = grant_one(core, 2.0, ttl=5.0)
    assert (lease.ttl, lease.expires_at) == (5.0, 7.0)
    assert core.next_wakeup() == 7.0


def test_heartbeat_after_expiry_raises_lease_expired(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    lease = grant_one(core, 0.0)
    core.expire(10.0)
    with pytest.raises(LeaseExpired, match=r"expired 1\.0 s ago"):
        core.heartbeat(lease.id, 11.0)


def test_heartbeat_past_the_deadline_raises_even_before_expire_runs(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    lease = grant_one(core, 0.0)
    with pytest.raises(LeaseExpired):
        core.heartbeat(lease.id, 10.5)
    assert lease.expires_at == 10.0  # not revived


def test_heartbeat_after_release_raises_lease_released(make_core):
    core = make_core(CPU4)
    lease = grant_one(core, 0.0)
    core.release(lease.id, 1.0)
    with pytest.raises(LeaseReleased, match="already released"):
        core.heartbeat(lease.id, 2.0)


def test_heartbeat_of_an_unknown_lease_raises(make_core):
    core = make_core(CPU4)
    with pytest.raises(UnknownLease, match="no lease 'l99'"):
        core.heartbeat("l99", 0.0)


def test_next_wakeup_skips_released_and_extended_leases(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    a = grant_one(core, 0.0, traj="a")
    b = grant_one(core, 1.0, traj="b")
    assert core.next_wakeup() == 10.0
    core.release(a.id, 2.0)
    assert core.next_wakeup() == 11.0
    core.heartbeat(b.id, 3.0)
    assert core.next_wakeup() == 13.0
    core.release(b.id, 4.0)
    assert core.next_wakeup() is None


# --------------------------------------------------------------------------- cancel


def test_cancel_removes_a_queued_action(make_core):
    core = make_core(CPU4)
    holder = grant_one(core, 0.0, traj="holder", n=4)
    waiting = core.submit(run("w", 2), 0.0)
    behind = core.submit(run("b", 1), 0.0)
    assert core.schedule(0.0) == []
    assert core.cancel(waiting.id, 1.0) is waiting
    assert core.queue_length == 1 and not core.is_queued(waiting.id)
    assert core.cancel(waiting.id, 1.0) is None  # already gone
    assert core.cancel(holder.action.id, 1.0) is None  # granted, not queued
    assert core.cancel("unknown", 1.0) is None
    assert core.counts["cancelled"] == 1
    core.release(holder.id, 2.0)
    (g,) = core.schedule(2.0)
    assert g.action is behind


# --------------------------------------------------------------------------- times


def test_per_action_times(make_core):
    core = make_core(CPU4, lease_ttl=10.0)
    core.submit(run("holder", 4), 0.0)
    (holder,) = core.schedule(0.0)
    a = core.submit(run("a", 2), 1.0)
    assert a.submitted_at == 1.0
    assert core.schedule(1.0) == []
    core.release(holder.lease.id, 3.0)
    (g,) = core.schedule(3.0)
    lease = g.lease
    assert lease.granted_at - a.submitted_at == pytest.approx(2.0)  # queueing time
    assert lease.expires_at == 13.0
    core.release(lease.id, 7.0)
    assert lease.ended_at == 7.0
    assert lease.ended_at - lease.granted_at == pytest.approx(4.0)


def test_expired_lease_ends_at_expiry(make_core):
    core = make_core(CPU4, lease_ttl=5.0)
    lease = grant_one(core, 2.0)
    core.expire(7.0)
    assert (lease.state, lease.outcome, lease.ended_at) == ("expired", "expired", 7.0)


# --------------------------------------------------------------------------- accounting


def test_busy_and_idle_unit_seconds_under_a_controlled_clock(make_core):
    core = make_core(CPU4)
    core.snapshot(0.0)  # start the books at t=0
    a = core.submit(run("a", 2), 0.0)
    (g,) = core.schedule(1.0)  # idle 0..1: 4 cores
    assert g.action is a
    b = grant_one(core, 2.0, traj="b", n=1)  # 1..2: 2 busy, 2 idle
    core.release(g.lease.id, 4.0)  # 2..4: 3 busy, 1 idle
    core.release(b.id, 5.0)  # 4..5: 1 busy, 3 idle
    snap = core.snapshot(6.0)["pools"]["cpu"]  # 5..6: 4 idle
    assert snap["busy_unit_seconds"] == pytest.approx(2 + 6 + 1)
    assert snap["idle_unit_seconds"] == pytest.approx(4 + 2 + 2 + 3 + 4)
    assert snap["busy_unit_seconds"] + snap["idle_unit_seconds"] == pytest.approx(4 * 6)


def test_expired_units_count_as_busy_until_taken_back(make_core):
    core = make_core(CPU4, lease_ttl=5.0)
    core.snapshot(0.0)
    grant_one(core, 0.0, n=3)
    core.expire(5.0)
    snap = core.snapshot(10.0)["pools"]["cpu"]
    assert snap["busy_unit_seconds"] == pytest.approx(15.0)
    assert snap["idle_unit_seconds"] == pytest.approx(5.0 + 20.0)


def test_quota_pool_counts_busy_permits_without_idle(make_core):
    core = make_core({"api": {"kind": "quota", "rate": {"per_second": 100}}})
    core.snapshot(0.0)
    core.submit(Action.build("t", {"api": 2}), 0.0)
    (g,) = core.schedule(0.0)
    core.release(g.lease.id, 3.0)
    snap = core.snapshot(5.0)["pools"]["api"]
    assert snap["busy_unit_seconds"] == pytest.approx(6.0)
    assert snap["idle_unit_seconds"] == 0.0  # no bounded capacity


def test_gpu_pool_accounting(make_core):
    core = make_core({"gpu": {"kind": "gpu", "nodes": [{"name": "g", "gpus": 4}]}})
    core.snapshot(0.0)
    core.submit(Action.build("t", {"gpu": 2}), 0.0)
    (g,) = core.schedule(0.0)
    core.release(g.lease.id, 2.5)
    snap = core.snapshot(4.0)["pools"]["gpu"]
    assert snap["busy_unit_seconds"] == pytest.approx(5.0)
    assert snap["idle_unit_seconds"] == pytest.approx(2 * 2.5 + 4 * 1.5)


def test_snapshot_counts(make_core):
    core = make_core(CPU4, lease_ttl=5.0)
    grant_one(core, 0.0, traj="a")
    b = grant_one(core, 0.0, traj="b")
    core.submit(run("c", 4), 0.0)
    core.schedule(0.0)
    core.release(b.id, 1.0)
    core.expire(5.0)
    snap = core.snapshot(5.0)
    assert snap["counts"] == {"submitted": 3, "granted": 2, "released": 1, "expired": 1}
    assert (snap["queued"], snap["leases"], snap["fencing"]) == (1, 0, 2)


def test_expiry_heap_stays_bounded_and_correct_under_heavy_churn(make_core):
    core = make_core(CPU4, lease_ttl=100.0)
    keeper = grant_one(core, 0.0, traj="keeper")
    for i in range(10_000):  # each release leaves a stale heap entry behind
        lease = grant_one(core, 0.001 * i, traj=f"t{i}")
        core.release(lease.id, 0.001 * i)
    assert len(core.table._heap) <= 2 * len(core.leases) + 4096
    # The one live lease still expires on time.
    assert core.expire(99.9) == []
    (ev,) = core.expire(100.0)
    assert ev.lease.id == keeper.id
    assert in_use(core, 100.0) == 0


def test_changing_a_handed_out_lease_changes_nothing_in_the_core(make_core):
    """The table keeps its own deadlines: a caller that sets ``expires_at`` on the lease
    it was given (to "extend" it, or by mistake) does not revive or extend it."""
    core = make_core(CPU4, lease_ttl=5.0)
    lease = grant_one(core, 0.0, traj="a")
    lease.expires_at = 1e9
    (ev,) = core.expire(5.0)
    assert ev.lease.id == lease.id and lease.expires_at == 5.0
    lapsed = grant_one(core, 6.0, traj="b")
    core.expire(11.0)
    lapsed.expires_at = 1e9  # a lapsed lease set alive again by hand
    with pytest.raises(LeaseExpired):
        core.heartbeat(lapsed.id, 12.0)
    assert core.lease_state(lapsed.id) == "expired"
