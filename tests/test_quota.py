"""The quota manager: concurrency cap, sliding window, token-bucket rate, tokens per minute."""

from __future__ import annotations

import pytest

from tangram.core.managers.quota import QuotaManager
from tangram.spec import Action


def quota(**limits: object) -> dict[str, object]:
    return {"api": {"kind": "quota", **limits}}


def call(traj: str = "t", n: int = 1, **kw: object) -> Action:
    return Action.build(traj, {"api": n}, **kw)  # type: ignore[arg-type]


def submit_n(core, k: int, now: float, n: int = 1, **kw: object) -> list[Action]:
    return [core.submit(call(f"t{i}", n, **kw), now) for i in range(k)]


def slots(grants) -> list[int]:
    return [u for g in grants for u in g.lease.allocation["api"].units]


# --------------------------------------------------------------------------- concurrency


def test_concurrency_cap_hands_out_distinct_slot_ids_up_to_the_cap(make_core):
    core = make_core(quota(concurrency=3))
    submit_n(core, 5, now=0.0)
    grants = core.schedule(0.0)
    assert len(grants) == 3
    assert sorted(slots(grants)) == [0, 1, 2]
    assert core.queue_length == 2
    # A second round with nothing released grants nothing more.
    assert core.schedule(0.0) == []
    snap = core.snapshot(0.0)["pools"]["api"]
    assert (snap["capacity"], snap["in_use"], snap["queued"]) == (3, 3, 2)


def test_released_slot_is_handed_to_the_next_waiter(make_core):
    core = make_core(quota(concurrency=3))
    submit_n(core, 5, now=0.0)
    first = core.schedule(0.0)
    middle = next(g for g in first if g.lease.allocation["api"].units == (1,))
    core.release(middle.lease.id, 1.0)
    again = core.schedule(1.0)
    assert len(again) == 1
    assert again[0].lease.allocation["api"].units == (1,)
    held = [u for lease in core.leases.values() for u in lease.allocation["api"].units]
    assert sorted(held) == [0, 1, 2]


def test_concurrency_never_exceeded_and_every_slot_comes_back(make_core):
    core = make_core(quota(concurrency=4))
    actions = [core.submit(call(f"t{i}", n=1 + i % 3), 0.0) for i in range(12)]
    t = 0.0
    granted: list[str] = []
    while len(granted) < len(actions):
        for g in core.schedule(t):
            granted.append(g.action.id)
            assert len(g.lease.allocation["api"].units) == g.action.demands["api"].min
        held = [u for lease in core.leases.values() for u in lease.allocation["api"].units]
        assert len(held) == len(set(held)), "a slot is held by two leases"
        assert set(held) <= {0, 1, 2, 3}
        assert len(held) <= 4
        oldest = min(core.leases.values(), key=lambda lease: lease.fencing_token)
        t += 1.0
        core.release(oldest.id, t)
    for lease in list(core.leases.values()):
        core.release(lease.id, t)
    assert granted == [a.id for a in actions]  # FCFS
    assert core.pools["api"].in_use == 0
    assert core.pools["api"].available(t)["concurrency"] == 4


def test_waiting_multi_permit_action_blocks_later_smaller_ones(make_core):
    core = make_core(quota(concurrency=2))
    core.submit(call("holder"), 0.0)
    assert len(core.schedule(0.0)) == 1
    big = core.submit(call("big", n=2), 0.0)
    small = core.submit(call("small", n=1), 0.0)
    # One permit is free, but FCFS keeps the small action behind the big one.
    assert core.schedule(0.0) == []
    assert core.is_queued(big.id) and core.is_queued(small.id)


def test_concurrency_wait_has_no_time_based_wakeup(make_core):
    core = make_core(quota(concurrency=1), lease_ttl=30.0)
    core.submit(call("a"), 0.0)
    core.schedule(0.0)
    core.submit(call("b"), 0.0)
    assert core.schedule(0.0) == []
    # Only a release (or the holder's expiry at 30) can admit it; no quota refill.
    assert core.next_wakeup() == pytest.approx(30.0)
    assert core.pools["api"].ready_at(call("b"), 1, 0.0) is None


# --------------------------------------------------------------------------- sliding window


def test_window_limits_grants_per_window_and_refills_after_it(make_core):
    core = make_core(quota(window={"limit": 2, "seconds": 10}))
    submit_n(core, 3, now=0.0)
    assert len(core.schedule(0.0)) == 2
    for lease in list(core.leases.values()):
        core.release(lease.id, 1.0)
    # Releasing does not give window quota back: it is spent for the window.
    assert core.schedule(1.0) == []
    assert core.next_wakeup() == pytest.approx(10.0)
    assert core.schedule(9.99) == []
    assert len(core.schedule(10.0)) == 1
    assert core.queue_length == 0


def test_window_slides_with_each_grant(make_core):
    core = make_core(quota(window={"limit": 2, "seconds": 10}))
    core.submit(call("a"), 0.0)
    assert len(core.schedule(0.0)) == 1
    core.submit(call("b"), 4.0)
    assert len(core.schedule(4.0)) == 1
    core.submit(call("c"), 5.0)
    assert core.schedule(5.0) == []
    assert core.next_wakeup() == pytest.approx(10.0)  # the grant at 0 leaves the window
    assert len(core.schedule(10.0)) == 1
    core.submit(call("d"), 11.0)
    assert core.schedule(11.0) == []
    assert core.next_wakeup() == pytest.approx(14.0)  # the grant at 4 leaves the window
    assert core.schedule(13.9) == []
    assert len(core.schedule(14.0)) == 1


def test_window_ready_at_counts_enough_old_grants_for_the_amount(make_core):
    core = make_core(quota(window={"limit": 3, "seconds": 10}))
    for t in (0.0, 2.0, 5.0):
        core.submit(call(f"t{t}"), t)
        assert len(core.schedule(t)) == 1
    mgr = core.pools["api"]
    assert isinstance(mgr, QuotaManager)
    # Two permits need the two oldest grants (at 0 and 2) to leave the window.
    assert mgr.ready_at(call("x", n=2), 2, 6.0) == pytest.approx(12.0)
    assert mgr.ready_at(call("x"), 1, 6.0) == pytest.approx(10.0)
    assert mgr.available(6.0)["window"] == 0
    assert mgr.available(10.0)["window"] == 1


# --------------------------------------------------------------------------- token bucket


def test_rate_per_second_with_burst(make_core):
    core = make_core(quota(rate={"per_second": 2, "burst": 2}))
    submit_n(core, 3, now=0.0)
    assert len(core.schedule(0.0)) == 2  # the burst
    assert core.next_wakeup() == pytest.approx(0.5)
    assert core.schedule(0.49) == []
    assert len(core.schedule(0.5)) == 1
    core.submit(call("late"), 0.5)
    assert core.schedule(0.5) == []
    assert core.next_wakeup() == pytest.approx(1.0)
    assert len(core.schedule(1.0)) == 1


def test_rate_per_minute_refills_only_up_to_the_burst(make_core):
    core = make_core(quota(rate={"per_minute": 60, "burst": 3}), lease_ttl=1000.0)
    submit_n(core, 5, now=0.0)
    assert len(core.schedule(0.0)) == 3
    assert core.next_wakeup() == pytest.approx(1.0)  # 60 per minute = one per second
    assert len(core.schedule(1.0)) == 1
    assert core.next_wakeup() == pytest.approx(2.0)
    assert len(core.schedule(2.0)) == 1
    # A long idle spell refills the bucket to the burst, no further.
    submit_n(core, 5, now=100.0)
    assert len(core.schedule(100.0)) == 3
    assert core.queue_length == 2
    assert core.next_wakeup() == pytest.approx(101.0)


def test_rate_multi_permit_action_waits_for_enough_tokens(make_core):
    core = make_core(quota(rate={"per_second": 1, "burst": 3}))
    core.submit(call("a", n=2), 0.0)
    assert len(core.schedule(0.0)) == 1
    core.submit(call("b", n=3), 0.0)
    assert core.schedule(0.0) == []
    assert core.next_wakeup() == pytest.approx(2.0)  # 1 left, needs 3, 1 per second
    assert core.schedule(1.9) == []
    assert len(core.schedule(2.0)) == 1


def test_combined_limits_wake_when_all_of_them_allow(make_core):
    core = make_core(quota(rate={"per_second": 1, "burst": 2}, window={"limit": 2, "seconds": 10}))
    submit_n(core, 3, now=0.0)
    assert len(core.schedule(0.0)) == 2
    # The rate refills at 1 s but the window holds until 10 s.
    assert core.next_wakeup() == pytest.approx(10.0)
    assert core.schedule(1.0) == []
    assert len(core.schedule(10.0)) == 1


# --------------------------------------------------------------------------- tokens per minute


def test_tokens_per_minute_estimate_charged_at_grant(make_core):
    core = make_core(quota(tokens_per_minute=600))  # 10 tokens per second
    submit_n(core, 3, now=0.0, tokens=300)
    assert len(core.schedule(0.0)) == 2
    assert core.next_wakeup() == pytest.approx(30.0)
    assert core.schedule(29.0) == []
    assert len(core.schedule(30.0)) == 1


def test_default_tokens_used_when_the_action_gives_none(make_core):
    core = make_core(quota(tokens_per_minute=600, default_tokens=200))
    submit_n(core, 4, now=0.0)
    assert len(core.schedule(0.0)) == 3
    assert core.next_wakeup() == pytest.approx(20.0)


def test_usage_above_estimate_is_a_debt_that_delays_the_next_grant(make_core):
    core = make_core(quota(tokens_per_minute=600))
    a = core.submit(call("a", tokens=100), 0.0)
    (grant,) = core.schedule(0.0)
    assert grant.action is a
    # Estimated 100, used 1100: 1000 more than charged; the bucket (500 left) goes to -500.
    core.release(grant.lease.id, 0.0, usage={"tokens": 1100})
    core.submit(call("b", tokens=100), 0.0)
    assert core.schedule(0.0) == []
    assert core.next_wakeup() == pytest.approx(60.0)  # 600 tokens short at 10 per second
    assert core.schedule(59.0) == []
    assert len(core.schedule(60.0)) == 1
    mgr = core.pools["api"]
    assert mgr.tokens_estimated_total == 200
    assert mgr.tokens_used_total == 1100


def test_usage_equal_to_estimate_changes_nothing(make_core):
    core = make_core(quota(tokens_per_minute=600))
    core.submit(call("a", tokens=100), 0.0)
    (grant,) = core.schedule(0.0)
    core.release(grant.lease.id, 0.0, usage={"tokens": 100})
    assert core.pools["api"].available(0.0)["tokens"] == pytest.approx(500.0)
    core.submit(call("b", tokens=500), 0.0)
    assert len(core.schedule(0.0)) == 1


def test_usage_below_estimate_is_credited_back(make_core):
    core = make_core(quota(tokens_per_minute=600))
    core.submit(call("a", tokens=600), 0.0)
    (grant,) = core.schedule(0.0)
    core.submit(call("b", tokens=300), 0.0)
    assert core.schedule(0.0) == []
    assert core.next_wakeup() == pytest.approx(30.0)
    core.release(grant.lease.id, 0.0, usage={"tokens": 100})  # 500 credited
    assert core.pools["api"].available(0.0)["tokens"] == pytest.approx(500.0)
    assert len(core.schedule(0.0)) == 1


def test_credit_never_fills_the_bucket_beyond_its_capacity(make_core):
    core = make_core(quota(tokens_per_minute=600), lease_ttl=1e9)
    core.submit(call("a", tokens=100), 0.0)
    (grant,) = core.schedule(0.0)
    core.release(grant.lease.id, 120.0, usage={"tokens": 0})
    assert core.pools["api"].available(120.0)["tokens"] == pytest.approx(600.0)


def test_tokens_ready_at_under_a_controlled_clock(make_core):
    core = make_core(quota(tokens_per_minute=120))  # 2 tokens per second
    core.submit(call("a", tokens=100), 0.0)
    core.schedule(0.0)
    mgr = core.pools["api"]
    big = call("b", tokens=60)
    assert mgr.ready_at(big, 1, 0.0) == pytest.approx(20.0)  # 20 left, needs 60
    assert mgr.ready_at(big, 1, 10.0) == pytest.approx(20.0)
    assert mgr.ready_at(big, 1, 20.0) is None  # fits now: nothing to wait for
    assert mgr.ready_at(call("c", tokens=20), 1, 0.0) is None
