"""The CPU manager: exact cores, NUMA groups, trajectory pinning, reserved memory, FCFS."""

from __future__ import annotations

from typing import Any

import pytest

from tangram.spec import Action


def cpu(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"cpu": {"kind": "cpu", "nodes": list(nodes)}}


def node(name: str, cores: int = 4, memory_gb: float = 64.0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "cores": cores, "memory_gb": memory_gb, **kw}


def run(traj: str, demand: Any, **kw: Any) -> Action:
    return Action.build(traj, {"cpu": demand}, **kw)


def alloc(grant) -> tuple[str, tuple[int, ...]]:
    a = grant.lease.allocation["cpu"]
    return a.node, a.units


def held_units(core) -> list[tuple[str, int]]:
    return [
        (lease.allocation["cpu"].node, u)
        for lease in core.leases.values()
        for u in lease.allocation["cpu"].units
    ]


# --------------------------------------------------------------------------- exact cores


def test_grants_exact_core_ids_and_never_the_same_core_twice(make_core):
    core = make_core(cpu(node("n", cores=[10, 11, 12, 13, 14, 15])), policy="min")
    actions = [core.submit(run(f"t{i}", 1 + i % 3), 0.0) for i in range(10)]
    t, done = 0.0, 0
    while done < len(actions):
        for g in core.schedule(t):
            n, units = alloc(g)
            assert n == "n"
            assert len(units) == g.action.demands["cpu"].min
            assert set(units) <= set(range(10, 16))
            done += 1
        held = held_units(core)
        assert len(held) == len(set(held)), f"a core is held twice: {held}"
        assert len(held) <= 6
        t += 1.0
        oldest = min(core.leases.values(), key=lambda lease: lease.fencing_token)
        core.release(oldest.id, t)
    for lease in list(core.leases.values()):
        core.release(lease.id, t)
    snap = core.snapshot(t)["pools"]["cpu"]
    assert snap["in_use"] == 0
    assert snap["topology"]["n"]["free_cores"] == 6


def test_released_cores_can_be_granted_again(make_core):
    core = make_core(cpu(node("n", cores=2)))
    core.submit(run("a", 2), 0.0)
    (g1,) = core.schedule(0.0)
    core.submit(run("b", 2), 0.0)
    assert core.schedule(0.0) == []
    core.release(g1.lease.id, 1.0)
    (g2,) = core.schedule(1.0)
    assert sorted(alloc(g2)[1]) == [0, 1]


# --------------------------------------------------------------------------- NUMA


def test_elastic_action_gets_cores_from_one_numa_group(make_core):
    # Two groups of four: 0-3 and 4-7.
    core = make_core(cpu(node("n", cores=8, numa=2)), policy="min")
    core.submit(run("a", 1), 0.0)
    assert len(core.schedule(0.0)) == 1
    core.submit(run("b", {"min": 3, "max": 6}), 0.0)
    (g2,) = core.schedule(0.0)
    units = set(alloc(g2)[1])
    assert len(units) == 3
    assert units <= {0, 1, 2, 3} or units <= {4, 5, 6, 7}, units


def test_best_fit_group_keeps_a_whole_group_for_a_later_large_action(make_core):
    core = make_core(cpu(node("n", cores=8, numa=2)), policy="min")
    core.submit(run("a", 1), 0.0)
    core.schedule(0.0)  # one group now has 3 free, the other 4
    core.submit(run("b", 3), 0.0)
    (g3,) = core.schedule(0.0)
    core.submit(run("c", 4), 0.0)
    (g4,) = core.schedule(0.0)
    groups = ({0, 1, 2, 3}, {4, 5, 6, 7})
    assert any(set(alloc(g3)[1]) <= g for g in groups)
    assert any(set(alloc(g4)[1]) == g for g in groups)


def test_tangram_elastic_cores_stay_in_one_numa_group_when_one_has_enough(make_core):
    core = make_core(cpu(node("n", cores=8, numa=[[0, 2, 4, 6], [1, 3, 5, 7]])))
    core.submit(run("a", {"min": 2, "max": 4}, duration=10.0, efficiency={"amdahl": 0.99}), 0.0)
    (g,) = core.schedule(0.0)
    units = set(alloc(g)[1])
    assert len(units) == 4
    assert units in ({0, 2, 4, 6}, {1, 3, 5, 7})


# --------------------------------------------------------------------------- pinning


def test_trajectory_is_pinned_to_the_node_of_its_first_action(make_core):
    core = make_core(cpu(node("a"), node("b")), policy="min")
    core.submit(run("t1", 2), 0.0)
    (g1,) = core.schedule(0.0)
    assert alloc(g1)[0] == "a"  # both idle: the first node
    core.release(g1.lease.id, 1.0)
    core.submit(run("t2", 3), 1.0)
    (g2,) = core.schedule(1.0)
    assert alloc(g2)[0] == "a"
    # t1's next action goes to its node a (1 core free) although b is idle.
    core.submit(run("t1", 1), 2.0)
    (g3,) = core.schedule(2.0)
    assert alloc(g3)[0] == "a"


def test_pinned_action_waits_for_its_node_even_when_another_is_free(make_core):
    core = make_core(cpu(node("a", cores=2), node("b", cores=2)), policy="min")
    core.submit(run("t1", 1), 0.0)
    (first,) = core.schedule(0.0)
    assert alloc(first)[0] == "a"
    core.release(first.lease.id, 1.0)
    core.submit(run("t2", 2), 1.0)
    (busy,) = core.schedule(1.0)
    assert alloc(busy)[0] == "a"
    later = core.submit(run("t1", 1), 2.0)
    assert core.schedule(2.0) == []  # b is idle, but t1 lives on a
    core.release(busy.lease.id, 3.0)
    (g,) = core.schedule(3.0)
    assert g.action is later and alloc(g)[0] == "a"


def test_memory_is_reserved_for_the_trajectory_until_it_closes(make_core):
    core = make_core(cpu(node("n", cores=8, memory_gb=16)))
    core.submit(run("t1", 1, memory_gb=12), 0.0)
    (g1,) = core.schedule(0.0)
    core.release(g1.lease.id, 1.0)
    topo = core.snapshot(1.0)["pools"]["cpu"]["topology"]["n"]
    assert topo["memory_free_gb"] == pytest.approx(4.0)  # still reserved between actions
    waiting = core.submit(run("t2", 1, memory_gb=8), 1.0)
    assert core.schedule(1.0) == []  # 8 cores free, but only 4 GB
    assert core.close_trajectory("t1", 2.0) == []
    (g2,) = core.schedule(2.0)
    assert g2.action is waiting
    topo = core.snapshot(2.0)["pools"]["cpu"]["topology"]["n"]
    assert topo["memory_free_gb"] == pytest.approx(8.0)


def test_later_actions_do_not_reserve_memory_again(make_core):
    core = make_core(cpu(node("n", cores=8, memory_gb=16)))
    for t in range(3):
        core.submit(run("t1", 1, memory_gb=12), float(t))
        (g,) = core.schedule(float(t))
        core.release(g.lease.id, t + 0.5)
    topo = core.snapshot(3.0)["pools"]["cpu"]["topology"]["n"]
    assert topo["memory_free_gb"] == pytest.approx(4.0)


def test_node_without_enough_memory_is_not_chosen(make_core):
    core = make_core(cpu(node("big", cores=8, memory_gb=32), node("small", cores=8, memory_gb=4)))
    core.submit(run("hog", 6), 0.0)
    (hog,) = core.schedule(0.0)
    assert alloc(hog)[0] == "big"
    core.submit(run("t1", 1, memory_gb=16), 0.0)
    (g,) = core.schedule(0.0)
    # small has 8 free cores against big's 2, but only 4 GB.
    assert alloc(g)[0] == "big"
    core.submit(run("t2", 2, memory_gb=16), 0.0)
    assert core.schedule(0.0) == []  # big has 1 free core, small too little memory


def test_placement_balances_load_across_nodes(make_core):
    core = make_core(cpu(node("a"), node("b"), node("c")), policy="min")
    for i in range(6):
        core.submit(run(f"t{i}", 1), 0.0)
    grants = core.schedule(0.0)
    per_node: dict[str, int] = {}
    for g in grants:
        per_node[alloc(g)[0]] = per_node.get(alloc(g)[0], 0) + 1
    assert per_node == {"a": 2, "b": 2, "c": 2}


def test_placement_balances_memory_as_well_as_cores(make_core):
    core = make_core(cpu(node("a", cores=8, memory_gb=32), node("b", cores=8, memory_gb=32)))
    core.submit(run("t1", 1, memory_gb=24), 0.0)
    (g1,) = core.schedule(0.0)
    core.release(g1.lease.id, 1.0)
    # a has all 8 cores free but 8 GB; b has everything: the memory-scarce a is avoided.
    core.submit(run("t2", 1, memory_gb=4), 1.0)
    (g2,) = core.schedule(1.0)
    assert alloc(g1)[0] != alloc(g2)[0]


# --------------------------------------------------------------------------- per-node FCFS


def test_waiting_pinned_action_on_one_node_does_not_block_another_node(make_core):
    core = make_core(cpu(node("a", cores=2), node("b", cores=2)), policy="min")
    core.submit(run("t1", 2), 0.0)
    core.submit(run("t2", 1), 0.0)
    (g1, g2) = core.schedule(0.0)
    assert (alloc(g1)[0], alloc(g2)[0]) == ("a", "b")
    stuck = core.submit(run("t1", 1), 1.0)  # pinned to a, which is full
    fresh = core.submit(run("t3", 1), 1.0)  # a new trajectory: b has a core
    own = core.submit(run("t2", 1), 1.0)  # pinned to b; b is full after t3
    grants = core.schedule(1.0)
    assert [g.action for g in grants] == [fresh]
    assert alloc(grants[0])[0] == "b"
    assert core.is_queued(stuck.id) and core.is_queued(own.id)


def test_waiting_pinned_action_blocks_later_actions_on_its_own_node(make_core):
    core = make_core(cpu(node("a", cores=4), node("b", cores=4)), policy="min")
    core.submit(run("t1", 3), 0.0)
    (g1,) = core.schedule(0.0)
    core.release(g1.lease.id, 1.0)
    core.submit(run("t2", 3), 1.0)
    (g2,) = core.schedule(1.0)
    assert alloc(g2)[0] == "a" and alloc(g1)[0] == "a"
    first = core.submit(run("t1", 2), 2.0)  # a has 1 core free: waits
    core.submit(run("t2", 1), 2.0)  # fits on a, but would overtake t1 there
    assert core.schedule(2.0) == []
    core.release(g2.lease.id, 3.0)
    grants = core.schedule(3.0)
    assert grants[0].action is first


# --------------------------------------------------------------------------- closing


def test_close_trajectory_cancels_its_queued_actions_only(make_core):
    core = make_core(cpu(node("n", cores=1)))
    core.submit(run("busy", 1), 0.0)
    core.schedule(0.0)
    mine = [core.submit(run("t1", 1), 0.0), core.submit(run("t1", 1), 0.0)]
    other = core.submit(run("t2", 1), 0.0)
    assert core.queue_length == 3
    cancelled = core.close_trajectory("t1", 1.0)
    assert sorted(c.action.id for c in cancelled) == sorted(a.id for a in mine)
    assert all(c.reason == "trajectory closed" for c in cancelled)
    assert core.queue_length == 1
    assert core.is_queued(other.id)
    assert not any(core.is_queued(a.id) for a in mine)
    assert core.counts["cancelled"] == 2


def test_closed_trajectory_can_be_placed_afresh(make_core):
    core = make_core(cpu(node("a", cores=2), node("b", cores=2)), policy="min")
    core.submit(run("t1", 1), 0.0)
    (g1,) = core.schedule(0.0)
    assert alloc(g1)[0] == "a"
    core.release(g1.lease.id, 1.0)
    core.close_trajectory("t1", 1.0)
    core.submit(run("hog", 2), 1.0)
    (hog,) = core.schedule(1.0)
    assert alloc(hog)[0] == "a"
    core.submit(run("t1", 1), 2.0)
    (g2,) = core.schedule(2.0)
    assert alloc(g2)[0] == "b"  # no longer pinned to a


def test_a_new_trajectory_waiting_for_memory_does_not_deadlock_the_pool(make_core):
    # Both nodes' memory is reserved by pinned trajectories; a new one needs memory that
    # only their closing can free. Their own later actions must still run.
    core = make_core(cpu(node("a", cores=2, memory_gb=4), node("b", cores=2, memory_gb=4)))
    for t in ("t1", "t2"):
        core.submit(run(t, 1, memory_gb=4), 0.0)
    for g in core.schedule(0.0):
        core.release(g.lease.id, 1.0)
    new = core.submit(run("t3", 1, memory_gb=4), 2.0)
    later = core.submit(run("t1", 1), 2.0)  # pinned to its node, behind t3 in the queue
    (g,) = core.schedule(2.0)
    assert g.action.id == later.id
    assert core.is_queued(new.id)
    core.release(g.lease.id, 3.0)
    core.close_trajectory("t1", 3.0)
    (g,) = core.schedule(3.0)
    assert g.action.id == new.id


def test_a_new_trajectory_waiting_for_cores_blocks_the_nodes_that_could_host_it(make_core):
    # Node a has the memory for t3 but no free core; node b lacks the memory. A pinned
    # action on a may not take a's next free core ahead of t3; one on b runs.
    core = make_core(cpu(node("a", cores=1, memory_gb=8), node("b", cores=2, memory_gb=4)))
    core.submit(run("ta", 1, memory_gb=5), 0.0)  # only a has 5 GB
    core.submit(run("tb", 1, memory_gb=4), 0.0)  # a has 3 GB left: b
    held = {g.action.trajectory: g for g in core.schedule(0.0)}
    assert alloc(held["ta"])[0] == "a" and alloc(held["tb"])[0] == "b"
    new = core.submit(run("t3", 1, memory_gb=3), 1.0)  # fits a's memory, not b's
    on_a = core.submit(run("ta", 1), 1.0)
    on_b = core.submit(run("tb", 1), 1.0)
    (g,) = core.schedule(1.0)
    assert g.action.id == on_b.id
    core.release(held["ta"].lease.id, 2.0)
    (g,) = core.schedule(2.0)
    assert g.action.id == new.id  # a's freed core went to t3, not to ta's later action
    assert core.is_queued(on_a.id)
