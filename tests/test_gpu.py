"""The GPU manager: buddy chunks, one action per GPU, the per-GPU service cache."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tangram.core.managers.gpu import GpuManager
from tangram.spec import Action, Resident


def gpu(
    *nodes: dict[str, Any], services: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {"gpu": {"kind": "gpu", "nodes": list(nodes), "services": services or {}}}


def gnode(name: str = "g", gpus: int = 8, memory_gb: float = 80.0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "gpus": gpus, "memory_gb": memory_gb, **kw}


def svc(memory_gb: float, restore: float = 5.0, parallelism: list[int] | None = None):
    return {"memory_gb": memory_gb, "restore_seconds": restore, "parallelism": parallelism or [1]}


def job(traj: str, demand: Any, service: str | None = None, **kw: Any) -> Action:
    return Action.build(traj, {"gpu": demand}, service=service, **kw)


def where(grant) -> tuple[str, tuple[int, ...]]:
    a = grant.lease.allocation["gpu"]
    return a.node, a.units


def free_chunks(core, node: str = "g") -> dict[str, list[int]]:
    topo = core.snapshot(0.0)["pools"]["gpu"]["topology"][node]["free_chunks"]
    return {k: v for k, v in topo.items() if v}


def mgr_of(core) -> GpuManager:
    m = core.pools["gpu"]
    assert isinstance(m, GpuManager)
    return m


# --------------------------------------------------------------------------- buddy chunks


def test_buddy_split_gives_aligned_chunks(make_core):
    core = make_core(gpu(gnode()), policy="min")
    for i, k in enumerate([1, 2, 4, 1]):
        core.submit(job(f"t{i}", k), 0.0)
    grants = core.schedule(0.0)
    assert [where(g)[1] for g in grants] == [(0,), (2, 3), (4, 5, 6, 7), (1,)]
    assert free_chunks(core) == {}


def test_release_coalesces_buddies_back_into_the_whole_node(make_core):
    core = make_core(gpu(gnode()), policy="min")
    for i, k in enumerate([1, 2, 4, 1]):
        core.submit(job(f"t{i}", k), 0.0)
    by_start = {where(g)[1][0]: g.lease.id for g in core.schedule(0.0)}
    core.release(by_start[0], 1.0)
    assert free_chunks(core) == {"1": [0]}
    core.release(by_start[1], 1.0)
    assert free_chunks(core) == {"2": [0]}
    core.release(by_start[4], 1.0)
    assert free_chunks(core) == {"2": [0], "4": [4]}  # 0-1 and 4-7 are not buddies
    core.release(by_start[2], 1.0)
    assert free_chunks(core) == {"8": [0]}


def test_whole_node_waits_for_fragments_to_coalesce(make_core):
    core = make_core(gpu(gnode()), policy="min")
    core.submit(job("small", 1), 0.0)
    (small,) = core.schedule(0.0)
    whole = core.submit(job("whole", 8), 0.0)
    assert core.schedule(0.0) == []  # 7 GPUs free, but not as one chunk
    core.release(small.lease.id, 1.0)
    (g,) = core.schedule(1.0)
    assert g.action is whole and where(g)[1] == tuple(range(8))


def test_chunks_never_span_nodes(make_core):
    core = make_core(gpu(gnode("a", gpus=4), gnode("b", gpus=4)), policy="min")
    core.submit(job("t0", 2), 0.0)
    core.submit(job("t1", 4), 0.0)
    core.submit(job("t2", 2), 0.0)
    core.submit(job("t3", 4), 0.0)
    grants = core.schedule(0.0)
    assert [where(g) for g in grants] == [("a", (0, 1)), ("b", (0, 1, 2, 3)), ("a", (2, 3))]
    assert core.queue_length == 1  # 4 GPUs would need a whole node


def test_at_most_one_action_per_gpu_and_chunks_stay_aligned(make_core):
    rng = random.Random(7)
    core = make_core(gpu(gnode("a"), gnode("b")), policy="min")
    sizes = [rng.choice([1, 1, 2, 4, 8]) for _ in range(60)]
    for i, k in enumerate(sizes):
        core.submit(job(f"t{i}", k), 0.0)
    t, granted = 0.0, 0
    while granted < len(sizes):
        for g in core.schedule(t):
            _, units = where(g)
            k = len(units)
            assert k == g.action.demands["gpu"].min
            assert units == tuple(range(units[0], units[0] + k))
            assert units[0] % k == 0, f"chunk {units} is not aligned"
            granted += 1
        held = [(lease.allocation["gpu"].node, u) for lease in core.leases.values()
                for u in lease.allocation["gpu"].units]  # fmt: skip
        assert len(held) == len(set(held)), "a GPU serves two actions"
        t += 1.0
        victims = rng.sample(list(core.leases), k=max(1, len(core.leases) // 2))
        for lid in victims:
            core.release(lid, t)
    for lid in list(core.leases):
        core.release(lid, t)
    assert free_chunks(core, "a") == {"8": [0]}
    assert free_chunks(core, "b") == {"8": [0]}
    assert mgr_of(core).in_use == 0


# --------------------------------------------------------------------------- service cache


def test_first_grant_restores_then_resident_chunk_is_preferred(make_core):
    core = make_core(gpu(gnode(), services={"rm": svc(40)}), policy="min")
    core.submit(job("other", 1), 0.0)
    (other,) = core.schedule(0.0)
    assert where(other)[1] == (0,)
    core.submit(job("t1", 1, service="rm"), 0.0)
    (first,) = core.schedule(0.0)
    assert where(first)[1] == (1,)
    assert first.lease.allocation["gpu"].restore is True
    assert first.lease.restore is True
    core.release(other.lease.id, 1.0)
    core.release(first.lease.id, 1.0)
    # GPU 0 is the lowest free position, but rm is resident on GPU 1.
    core.submit(job("t2", 1, service="rm"), 2.0)
    (second,) = core.schedule(2.0)
    assert where(second)[1] == (1,)
    assert second.lease.allocation["gpu"].restore is False
    assert second.lease.allocation["gpu"].evicts == ()
    m = mgr_of(core)
    assert (m.restores, m.cache_hits) == (1, 1)


def test_busy_resident_chunk_means_a_restore_elsewhere(make_core):
    core = make_core(gpu(gnode(), services={"rm": svc(40)}), policy="min")
    core.submit(job("t1", 1, service="rm"), 0.0)
    (g1,) = core.schedule(0.0)
    core.submit(job("t2", 1, service="rm"), 0.0)
    (g2,) = core.schedule(0.0)
    assert where(g2)[1] != where(g1)[1]
    assert g2.lease.restore is True


def test_extra_cost_is_zero_only_when_resident_and_free(make_core):
    core = make_core(gpu(gnode(), services={"rm": svc(40, restore=7.5)}), policy="min")
    m = mgr_of(core)
    probe = job("p", 1, service="rm")
    assert m.extra_cost(probe, 1) == pytest.approx(7.5)
    core.submit(job("t1", 1, service="rm"), 0.0)
    (g,) = core.schedule(0.0)
    assert m.extra_cost(probe, 1) == pytest.approx(7.5)  # resident but busy
    core.release(g.lease.id, 1.0)
    assert m.extra_cost(probe, 1) == 0.0
    assert m.extra_cost(job("p", 1), 1) == 0.0  # no service, nothing to restore


def test_lru_eviction_names_the_least_recently_used_victim(make_core):
    services = {"s1": svc(30), "s2": svc(30), "s3": svc(30), "big": svc(70)}
    core = make_core(gpu(gnode(gpus=1), services=services), policy="min")

    def use(service: str, t: float):
        core.submit(job(f"t-{service}-{t}", 1, service=service), t)
        (g,) = core.schedule(t)
        core.release(g.lease.id, t + 0.5)
        return g.lease.allocation["gpu"]

    assert use("s1", 0).evicts == ()
    assert use("s2", 1).evicts == ()  # 60 of 80 GB
    hit = use("s1", 2)  # s1 becomes the most recently used
    assert hit.restore is False
    third = use("s3", 3)  # 90 > 80: the least recently used (s2) goes
    assert third.restore is True
    assert third.evicts == (Resident("s2", 1, "g", 0),)
    m = mgr_of(core)
    assert m.is_resident("s1", 1, "g", 0) and m.is_resident("s3", 1, "g", 0)
    assert not m.is_resident("s2", 1, "g", 0)
    # 70 GB needs both residents out, least recently used first.
    assert use("big", 4).evicts == (Resident("s1", 1, "g", 0), Resident("s3", 1, "g", 0))
    assert m.evictions == 3


def test_each_parallelism_is_its_own_variant(make_core):
    services = {"m": svc(160, restore=10, parallelism=[2, 4])}
    core = make_core(gpu(gnode(), services=services), policy="min")
    m = mgr_of(core)
    # 1 GPU is not a parallelism of m: min picks the smallest variant, 2.
    core.submit(job("t1", {"choices": [1, 2, 4]}, service="m"), 0.0)
    (g1,) = core.schedule(0.0)
    assert where(g1)[1] == (0, 1) and g1.lease.restore
    core.release(g1.lease.id, 1.0)
    assert m.is_resident("m", 2, "g", 0)
    assert m.extra_cost(job("p", 4, service="m"), 4) == pytest.approx(10.0)
    core.submit(job("t2", 4, service="m"), 1.0)
    (g2,) = core.schedule(1.0)
    alloc = g2.lease.allocation["gpu"]
    assert alloc.units == (0, 1, 2, 3)
    assert alloc.restore is True
    # tp4 needs 40 GB on each GPU; GPUs 0-1 were full with tp2 (80 GB each).
    assert alloc.evicts == (Resident("m", 2, "g", 0),)
    assert m.is_resident("m", 4, "g", 0) and not m.is_resident("m", 2, "g", 0)


def test_variant_fixed_policy_uses_parallelism_allowed_by_the_service(make_core):
    services = {"m": svc(80, parallelism=[1, 2, 8])}
    core = make_core(gpu(gnode(), services=services), policy="fixed:4")
    core.submit(job("t1", {"choices": [1, 2, 4, 8]}, service="m"), 0.0)
    (g,) = core.schedule(0.0)
    assert len(where(g)[1]) == 2  # 4 is not a variant of m: the largest one below it


def test_scheduler_prefers_the_resident_variant_when_restore_is_costly(make_core):
    services = {"m": svc(80, restore=100.0, parallelism=[1, 2, 4])}
    core = make_core(gpu(gnode(), services=services))
    eff = {"amdahl": 0.9}
    core.submit(job("warm", 1, service="m"), 0.0)
    (g,) = core.schedule(0.0)
    core.release(g.lease.id, 1.0)
    core.submit(job("t", {"choices": [1, 2, 4]}, service="m", duration=10.0, efficiency=eff), 1.0)
    (g2,) = core.schedule(1.0)
    assert where(g2)[1] == where(g)[1]
    assert g2.lease.restore is False


def test_scheduler_takes_more_gpus_when_nothing_is_resident(make_core):
    services = {"m": svc(80, restore=1.0, parallelism=[1, 2, 4])}
    core = make_core(gpu(gnode(), services=services))
    core.submit(
        job("t", {"choices": [1, 2, 4]}, service="m", duration=10.0, efficiency={"amdahl": 0.9}),
        0.0,
    )
    (g,) = core.schedule(0.0)
    assert len(where(g)[1]) == 4


def test_extra_cost_agrees_with_the_chunk_allocate_picks(make_core):
    core = make_core(gpu(gnode(), services={"rm": svc(40)}), policy="min")

    def one(traj: str, service: str | None = None):
        core.submit(job(traj, 1, service=service), 0.0)
        (g,) = core.schedule(0.0)
        return g

    one("x0")  # GPU 0
    x1 = one("x1")  # GPU 1
    warm = one("warm", "rm")  # GPU 2 (from the 2-chunk at 2)
    assert where(warm)[1] == (2,)
    core.release(warm.lease.id, 1.0)
    core.release(x1.lease.id, 1.0)  # free: GPU 1 alone, 2-3, 4-7; rm resident on 2
    # Best fit takes the lone GPU 1 (the paper's rule: smallest sufficient chunk first,
    # residency only breaks ties), so the scheduler must be told a restore is coming.
    probe = job("p", 1, service="rm")
    assert mgr_of(core).extra_cost(probe, 1) == 5.0
    g = one("again", "rm")
    assert g.lease.restore is True
    assert where(g)[1] == (1,)
    # With the lone GPU taken, the resident GPU 2 is among the smallest free chunks: a hit.
    assert mgr_of(core).extra_cost(probe, 1) == 0.0
    assert one("hit", "rm").lease.restore is False


def test_a_failed_action_leaves_no_false_residency(make_core):
    # The grant restores rm on GPU 0; the holder reports an error (the restore may have
    # failed), so the broker no longer counts rm as resident there: the next grant
    # restores again instead of assuming a warm cache.
    core = make_core(gpu(gnode(), services={"rm": svc(40)}), policy="min")
    core.submit(job("a", 1, service="rm"), 0.0)
    (g,) = core.schedule(0.0)
    assert g.lease.restore is True
    core.release(g.lease.id, 1.0, outcome="error")
    core.submit(job("b", 1, service="rm"), 2.0)
    (again,) = core.schedule(2.0)
    assert again.lease.restore is True
    core.release(again.lease.id, 3.0)  # a success keeps it resident
    core.submit(job("c", 1, service="rm"), 4.0)
    (warm,) = core.schedule(4.0)
    assert warm.lease.restore is False
