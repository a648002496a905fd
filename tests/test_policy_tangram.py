"""The default policy, ``tangram``: each mechanism on a hand-computed case.

The expected amounts are worked out here from the documented rule (the target amount m
minimises ``(w + lam * m) * d(m)`` with ``lam = price * rho / (1 - rho)**2``), not read
back from the policy.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from tangram.core.policy import Tangram
from tangram.spec import Action

P = 0.9  # Amdahl parallel fraction of every elastic action below


def cpu(cores: int = 8) -> dict[str, Any]:
    return {"cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": cores, "memory_gb": 64}]}}


def elastic(traj: str, duration: float | None = 10.0, hi: int = 8, **kw: Any) -> Action:
    return Action.build(
        traj, {"cpu": {"min": 1, "max": hi}}, duration=duration, efficiency={"amdahl": P}, **kw
    )


def d(m: int, d1: float = 10.0) -> float:
    return d1 * ((1 - P) + P / m)


def target(lam: float, w: float = 1.0, hi: int = 8, d1: float = 10.0) -> int:
    costs = {m: (w + lam * m) * d(m, d1) for m in range(1, hi + 1)}
    return min(costs, key=lambda m: costs[m])


def lam(load: float, cap: int, price: float = 0.2, saturation: float = 0.8) -> float:
    rho = min(saturation, load / cap)
    return price * rho / (1 - rho) ** 2


def test_unit_price_follows_the_load(make_core):
    core = make_core(cpu(), lease_ttl=1e9)
    pol = core.policy
    assert isinstance(pol, Tangram)
    assert pol.unit_price("cpu") == 0.0  # nothing queued or running
    for i in range(3):
        core.submit(Action.build(f"f{i}", {"cpu": 1}, duration=5.0), 0.0)
    assert pol.unit_price("cpu") == pytest.approx(lam(3, 8))
    core.schedule(0.0)  # three running, none queued: the same load
    assert pol.unit_price("cpu") == pytest.approx(lam(3, 8))
    for i in range(30):
        core.submit(Action.build(f"q{i}", {"cpu": 1}, duration=5.0), 0.0)
    assert pol.unit_price("cpu") == pytest.approx(lam(33, 8))  # capped at rho = 0.8
    assert pol.unit_price("cpu") == pytest.approx(0.2 * 0.8 / 0.2**2)
    high = make_core(cpu(), policy="tangram:saturation=0.95", lease_ttl=1e9)
    for i in range(33):
        high.submit(Action.build(f"q{i}", {"cpu": 1}, duration=5.0), 0.0)
    assert high.policy.unit_price("cpu") == pytest.approx(lam(33, 8, saturation=0.95))


def test_a_lone_action_on_an_idle_node_takes_what_pays(make_core):
    core = make_core(cpu(), lease_ttl=1e9)
    core.submit(elastic("t"), 0.0)
    (g,) = core.schedule(0.0)
    want = target(lam(1, 8))
    assert want == 8  # the price of an idle node is nearly nothing
    assert g.lease.dop == want


def test_a_loaded_pool_prices_units_out_of_reach(make_core):
    core = make_core(cpu(), lease_ttl=1e9)
    actions = [elastic(f"t{i}") for i in range(24)]
    for a in actions:
        core.submit(a, 0.0)
    grants = core.schedule(0.0)
    # At the capped price the target is 2 cores: admitted on a quarter of it, one core,
    # and none is left over for the arrangement to add.
    assert target(lam(24, 8)) == 2
    # 24 waiting on 8 cores: every core goes to a different action, in FCFS order.
    assert [g.action.id for g in grants] == [a.id for a in actions[:8]]
    assert [g.lease.dop for g in grants] == [1] * 8


def test_admission_waits_for_a_share_of_the_target(make_core):
    core = make_core(cpu(), lease_ttl=1e9)
    core.submit(Action.build("hog", {"cpu": 7}, duration=5.0), 0.0)
    (hog,) = core.schedule(0.0)
    core.submit(elastic("t"), 0.0)
    want = target(lam(2, 8))
    assert want == 8
    # A quarter of 8 is 2 cores; one is free: it waits (the paper would start it on 1).
    assert core.schedule(0.0) == []
    core.release(hog.lease.id, 1.0)
    (g,) = core.schedule(1.0)
    assert g.lease.dop == target(lam(1, 8)) == 8


def test_share_one_waits_for_the_whole_target(make_core):
    core = make_core(cpu(), policy="tangram:share=1", lease_ttl=1e9)
    core.submit(Action.build("hog", {"cpu": 2}, duration=5.0), 0.0)
    (hog,) = core.schedule(0.0)
    core.submit(elastic("t"), 0.0)
    assert target(lam(2, 8)) == 8
    assert core.schedule(0.0) == []  # 6 free of the 8 it is worth waiting for
    core.release(hog.lease.id, 1.0)
    assert core.schedule(1.0)[0].lease.dop == 8


def test_free_units_are_shared_by_priced_cost(make_core):
    # Two actions on an idle node of 8: each is worth 8 alone, so they split the node;
    # the DP's split is the least total priced cost, computed here by brute force (each
    # admitted at a quarter of 8; b, 40 s against a typical 10 s, weighs 4).
    core = make_core(cpu(), lease_ttl=1e9)
    core.submit(elastic("a"), 0.0)
    core.submit(elastic("b", duration=40.0), 0.0)
    grants = core.schedule(0.0)
    x = lam(2, 8)
    wb = 4.0
    best = min(
        ((m, n) for m in range(2, 7) for n in range(2, 9 - m)),
        key=lambda mn: (1 + x * mn[0]) * d(mn[0]) + (wb + x * mn[1]) * d(mn[1], 40.0),
    )
    assert best == (2, 6)
    assert tuple(g.lease.dop for g in grants) == best


def test_long_actions_weigh_more(make_core):
    # The pool's typical action is learned from what it queued (a geometric mean); an
    # action is weighed when queued against the typical one before it: ten times as
    # long weighs ten, so it gets a larger target at the same price.
    core = make_core(cpu(64), lease_ttl=1e9)
    for i in range(40):
        core.submit(Action.build(f"f{i}", {"cpu": 1}, duration=5.0), 0.0)
    core.submit(elastic("s", hi=32), 0.0)
    core.submit(elastic("l", duration=100.0, hi=32), 0.0)
    grants = {g.action.trajectory: g.lease.dop for g in core.schedule(0.0)}
    x = lam(42, 64)
    pol = core.policy
    assert isinstance(pol, Tangram)
    assert pol.typical["cpu"] == pytest.approx(math.log(10.0) + 0.02 * math.log(10.0))
    w = 10.0
    assert (grants["s"], grants["l"]) == (target(x, hi=32), target(x, w, 32, 100.0))
    assert grants["s"] < grants["l"]


def test_boost_zero_treats_long_and_short_alike(make_core):
    core = make_core(cpu(64), policy="tangram:boost=0", lease_ttl=1e9)
    for i in range(40):
        core.submit(Action.build(f"f{i}", {"cpu": 1}, duration=5.0), 0.0)
    core.submit(elastic("s", hi=32), 0.0)
    core.submit(elastic("l", duration=100.0, hi=32), 0.0)
    grants = {g.action.trajectory: g.lease.dop for g in core.schedule(0.0)}
    # Amdahl: the target does not depend on the duration itself, only on the weight.
    assert grants["s"] == grants["l"]


def test_an_action_without_a_duration_is_priced_by_its_task_profile(make_core):
    core = make_core(cpu(), lease_ttl=1e9)
    core.submit(elastic("first", duration=None), 0.0)
    (g,) = core.schedule(0.0)
    # Nothing known: weight 1, and the target does not depend on the duration.
    assert g.lease.dop == target(lam(1, 8)) == 8
    core.release(g.lease.id, d(8))  # ran d(8) on 8 cores: 10 s at the minimum
    pol = core.policy
    assert isinstance(pol, Tangram)
    assert pol.profiles[("default", "cpu", 1, 8)] == (1, pytest.approx(10.0))
    core.submit(elastic("second", duration=None), 20.0)
    (g2,) = core.schedule(20.0)
    assert g2.lease.dop == target(lam(1, 8)) == 8
    core.release(g2.lease.id, 20.0 + d(8, 20.0))  # twice as slow as the first
    assert pol.profiles[("default", "cpu", 1, 8)] == (2, pytest.approx(15.0))


def test_other_tasks_do_not_share_a_profile(make_core):
    core = make_core(cpu(), lease_ttl=1e9)
    core.submit(elastic("a", duration=None, task="coding"), 0.0)
    (g,) = core.schedule(0.0)
    core.release(g.lease.id, 10.0)
    pol = core.policy
    assert isinstance(pol, Tangram)
    assert ("coding", "cpu", 1, 8) in pol.profiles
    assert ("math", "cpu", 1, 8) not in pol.profiles
    core.submit(elastic("b", duration=None, task="math"), 10.0)
    (g2,) = core.schedule(10.0)
    assert ("math", "cpu", 1, 8) not in pol.profiles  # learned only when it ends
    core.release(g2.lease.id, 12.0)
    assert pol.profiles[("math", "cpu", 1, 8)][0] == 1


def test_a_long_action_waits_for_more_of_its_target(make_core):
    # The pool's typical action is 10 s; one of 400 s weighs 40 > long (20), so it waits
    # for share * (40 / 20) ** 0.5 of its target instead of share of it.
    core = make_core(cpu(64), lease_ttl=1e9)
    core.submit(Action.build("hog", {"cpu": 56}, duration=50.0), 0.0)
    (hog,) = core.schedule(0.0)
    s = core.submit(elastic("s", hi=32), 0.0)  # sets the typical duration
    core.cancel(s.id, 0.0)
    core.submit(elastic("l", duration=400.0, hi=32), 0.0)
    pol = core.policy
    assert isinstance(pol, Tangram)
    x = pol.unit_price("cpu")
    assert target(x, 40.0, 32, 400.0) == 32
    want = 0.25 * (40.0 / 20.0) ** 0.5 * 32
    assert 8 < want < 12  # 8 cores are free: a quarter of 32 would have started it
    assert core.schedule(0.0) == []
    core.release(hog.lease.id, 1.0)
    (g,) = core.schedule(1.0)
    assert g.lease.dop >= want


def test_gpu_pools_are_arranged_by_the_paper_scheduler(make_core):
    # A restore makes an amount's cost depend on what is resident, which a unit price
    # does not capture: on pools of GPU services tangram schedules as paper does.
    service = {"memory_gb": 10, "restore_seconds": 2.0, "parallelism": [1, 2, 4, 8]}
    pools = {
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g", "gpus": 8, "memory_gb": 80}],
            "services": {"m": service},
        }
    }
    out = {}
    for name in ("tangram", "paper"):
        core = make_core(pools, policy=name, lease_ttl=1e9)
        for i in range(3):
            core.submit(
                Action.build(
                    f"t{i}",
                    {"gpu": {"choices": [1, 2, 4, 8]}},
                    service="m",
                    duration=6.0,
                    efficiency={"table": {"1": 1.0, "2": 0.9, "4": 0.75, "8": 0.55}},
                ),
                0.0,
            )
        out[name] = [(g.action.trajectory, g.lease.dop) for g in core.schedule(0.0)]
    assert out["tangram"] == out["paper"]
    assert out["paper"]  # something was granted


def one_core_trace(make_core: Any, policy: str) -> list[str]:
    """One core, held until t=4 while four one-core actions queue (a: 8 s at t=0, b: 4 s
    at t=1, c: 2 s at t=2, d: 1 s at t=3); then each grant ends before the next round,
    and e (0.5 s) arrives at t=8. Returns the trajectories in the order granted."""
    core = make_core(cpu(1), policy=policy, lease_ttl=1e9)
    core.submit(Action.build("hog", {"cpu": 1}, duration=100.0), 0.0)
    (held,) = core.schedule(0.0)
    for t, (name, dur) in enumerate([("a", 8.0), ("b", 4.0), ("c", 2.0), ("d", 1.0)]):
        core.submit(Action.build(name, {"cpu": 1}, duration=dur), float(t))
    order = []
    for now in (4.0, 5.5, 7.0, 8.0, 9.0):
        if now == 8.0:
            core.submit(Action.build("e", {"cpu": 1}, duration=0.5), now)
        core.release(held.lease.id, now)
        (held,) = core.schedule(now)
        order.append(held.action.trajectory)
    assert core.queue_length == 0
    return order


def test_shortest_first_until_overdue_then_fcfs(make_core):
    # t=4: nothing has waited 5 s: the shortest, d, goes first.
    # t=5.5: a has waited 5.5 s, overdue: it goes before the shorter b and c.
    # t=7: b (6 s) and c (5 s) are both overdue: FCFS, b before the shorter c.
    # t=8: c (6 s) is overdue, e (0 s) is not: c first, whatever e's duration.
    # t=9: e.
    assert one_core_trace(make_core, "tangram:overdue=5,grain=1") == ["d", "a", "b", "c", "e"]
    # Without the bound's effect (nothing overdue within the trace): shortest first.
    assert one_core_trace(make_core, "tangram:overdue=100,grain=1") == ["d", "c", "b", "e", "a"]


def test_durations_in_one_class_keep_fcfs(make_core):
    # grain 4: a (8 s) and b (4 s) share the class [4, 16), c (2 s) and d (1 s) the
    # class [1, 4), e (0.5 s) is in [0.25, 1). The default grain is 4.
    # overdue 5: t=4: the shorter class first, c before d (FCFS within it); t=5.5: a
    # overdue; t=7: b overdue; t=8: d overdue (queued at 3), before the shorter e.
    assert one_core_trace(make_core, "tangram:overdue=5") == ["c", "a", "b", "d", "e"]
    # Nothing overdue: c, d (FCFS in their class), a before b (in theirs) at t=7, then
    # e, which arrives at t=8 in the shortest class, before b.
    assert one_core_trace(make_core, "tangram:overdue=100,grain=4") == ["c", "d", "a", "e", "b"]


@pytest.mark.parametrize("policy", ["tangram:overdue=0", "min", "fixed:4", "paper"])
def test_overdue_zero_and_the_other_policies_keep_fcfs(make_core, policy):
    assert one_core_trace(make_core, policy) == ["a", "b", "c", "d", "e"]


def test_a_blocked_waiter_holds_back_those_after_it_in_the_walk(make_core):
    # Two cores, one free. s (1 s, two cores) comes first in the walk and does not fit:
    # l (9 s, one core), after it in the walk though queued before it, waits behind it.
    core = make_core(cpu(2), policy="tangram:overdue=5", lease_ttl=1e9)
    core.submit(Action.build("hog", {"cpu": 1}, duration=100.0), 0.0)
    (hog,) = core.schedule(0.0)
    core.submit(Action.build("l", {"cpu": 1}, duration=9.0), 0.0)
    core.submit(Action.build("s", {"cpu": 2}, duration=1.0), 1.0)
    assert core.schedule(2.0) == []
    # Once l is overdue it goes first and takes the free core.
    (g,) = core.schedule(5.0)
    assert g.action.trajectory == "l"
    core.release(hog.lease.id, 6.0)
    assert core.schedule(6.0) == []  # s waits for both cores
    core.release(g.lease.id, 7.0)
    assert [g.action.trajectory for g in core.schedule(7.0)] == ["s"]


def test_an_undeclared_duration_is_its_kinds_observed_mean(make_core):
    # Nothing declares a duration. A kind never seen is expected to take 0 s (it goes
    # first and is measured); once seen, its mean held time orders it.
    core = make_core(cpu(1), policy="tangram:overdue=5,grain=1", lease_ttl=1e9)
    pol = core.policy
    assert isinstance(pol, Tangram)
    now = 0.0
    for task, took in (("slow", 3.0), ("quick", 1.0)):
        core.submit(Action.build("x", {"cpu": 1}, task=task), now)
        (g,) = core.schedule(now)
        now += took
        core.release(g.lease.id, now)
    assert pol.means[("slow", (("cpu", 1, 1),))] == (1, pytest.approx(3.0))
    assert pol.means[("quick", (("cpu", 1, 1),))] == (1, pytest.approx(1.0))
    core.submit(Action.build("hog", {"cpu": 1}, duration=10.0), now)
    (hog,) = core.schedule(now)
    for task in ("slow", "quick", "new"):
        core.submit(Action.build(task, {"cpu": 1}, task=task), now)
    order = []
    for _ in range(3):
        now += 1.0
        core.release(hog.lease.id, now)
        (hog,) = core.schedule(now)
        order.append(hog.action.trajectory)
    assert order == ["new", "quick", "slow"]


def test_the_shortest_first_index_follows_the_queue(make_core):
    # 10,000 queued stay cheap: the core keeps them sorted as they come and go, and a
    # round reads only the head of the order (checked for consistency here).
    core = make_core(cpu(4), policy="tangram:overdue=5", lease_ttl=1e9)
    ids = [
        core.submit(Action.build(f"t{i}", {"cpu": 1}, duration=float(i % 7)), 0.0).id
        for i in range(50)
    ]
    for aid in ids[::3]:
        core.cancel(aid, 0.0)
    core.schedule(0.0)
    index = core._shortest
    assert index is not None
    assert index == sorted(index)
    assert {item[2] for item in index} == {a.id for a in core.queued()}
    assert all(item[3].order == item[:3] for item in index)
    assert make_core(cpu(4), policy="tangram:overdue=0")._shortest is None


def test_actions_on_pools_of_gpu_services_keep_fcfs(make_core):
    # Those pools are arranged by the paper's scheduler, whose queue estimate reads the
    # waiters in FCFS order: a shorter action does not pass a longer one there.
    pools = {
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g", "gpus": 1, "memory_gb": 80}],
            "services": {"m": {"memory_gb": 10, "restore_seconds": 0.0, "parallelism": [1]}},
        }
    }
    core = make_core(pools, policy="tangram:overdue=5", lease_ttl=1e9)
    core.submit(Action.build("hog", {"gpu": 1}, service="m", duration=100.0), 0.0)
    (held,) = core.schedule(0.0)
    for t, (name, dur) in enumerate([("a", 8.0), ("b", 4.0), ("c", 1.0)]):
        core.submit(Action.build(name, {"gpu": 1}, service="m", duration=dur), float(t))
    order = []
    for now in (3.0, 3.5, 4.0):
        core.release(held.lease.id, now)
        (held,) = core.schedule(now)
        order.append(held.action.trajectory)
    assert order == ["a", "b", "c"]
