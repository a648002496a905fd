"""Request slots on GPU services: a running instance of a service with
``max_concurrency`` > 1 serves that many actions at once (an engine batches them), its
chunk stays busy until the last one ends, and every action on it carries the instance's
epoch so executors fence instances, not the actions sharing one."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tangram.core.managers.gpu import GpuManager, Service
from tangram.executors import Fence, GrantSigner, StaleLease
from tangram.kinds.base import ConfigError
from tangram.sim.executor import check_pools
from tangram.spec import Action, Allocation
from tangram.wire import allocation_in, allocation_out


def pools(gpus: int = 2, slots: int = 3, **svc: Any) -> dict[str, Any]:
    judge = {"memory_gb": 40.0, "restore_seconds": 2.0, "max_concurrency": slots, **svc}
    other = {"memory_gb": 40.0, "restore_seconds": 2.0, "parallelism": [min(2, gpus)]}
    return {
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g", "gpus": gpus, "memory_gb": 80.0}],
            "services": {"judge": judge, "big": other},
        }
    }


def call(traj: str, service: str = "judge", k: int = 1) -> Action:
    return Action.build(traj, {"gpu": k}, service=service, duration=10.0)


def alloc_of(grant: Any) -> Allocation:
    return grant.lease.allocation["gpu"]


def mgr(core: Any) -> GpuManager:
    m = core.pools["gpu"]
    assert isinstance(m, GpuManager)
    return m


def test_actions_join_a_running_instance_until_its_slots_are_full(make_core):
    core = make_core(pools(slots=3), policy="min")
    for i in range(4):
        core.submit(call(f"t{i}"), 0.0)
    grants = core.schedule(0.0)
    assert len(grants) == 4
    first, *rest = [alloc_of(g) for g in grants]
    # The first opens an instance on GPU 0 (a restore); two join it, costing no GPU and
    # no restore; the fourth finds the slots full and opens a second one on GPU 1.
    assert (first.units, first.restore, first.epoch) == ((0,), True, 0)
    token = grants[0].lease.fencing_token
    assert [(a.units, a.restore, a.epoch) for a in rest[:2]] == [((0,), False, token)] * 2
    assert (rest[2].units, rest[2].restore) == ((1,), True)
    check_pools(core)
    m = mgr(core)
    assert m.usage() == {"g": (2, 2)}
    assert m.joins == 2
    assert m.topology()["g"]["instances"]["0"] == {"service": "judge", "k": 1, "active": 3}


def test_the_chunk_stays_busy_until_the_instance_s_last_action_ends(make_core):
    core = make_core(pools(gpus=1, slots=2), policy="min")
    core.submit(call("a"), 0.0)
    core.submit(call("b"), 0.0)
    a, b = core.schedule(0.0)
    core.submit(call("c"), 0.0)
    assert core.schedule(0.0) == []  # both slots taken, no GPU free
    core.release(a.lease.id, 1.0)
    (c,) = core.schedule(1.0)  # a's slot, on the same instance
    assert alloc_of(c).epoch == a.lease.fencing_token
    assert mgr(core).usage() == {"g": (1, 1)}
    core.release(b.lease.id, 2.0)
    assert mgr(core).usage() == {"g": (1, 1)}
    core.release(c.lease.id, 3.0)
    assert mgr(core).usage() == {"g": (1, 0)}
    assert mgr(core).slots == {}
    # A new instance later gets its own, newer epoch: the lease that opens it.
    core.submit(call("d"), 4.0)
    core.submit(call("e"), 4.0)
    d, e = core.schedule(4.0)
    assert alloc_of(d).restore is False  # still resident: a warm start
    assert alloc_of(e).epoch == d.lease.fencing_token > c.lease.fencing_token


def test_a_waiter_for_gpus_does_not_hold_back_a_joiner(make_core):
    core = make_core(pools(gpus=2, slots=4), policy="min")
    core.submit(call("a"), 0.0)
    assert len(core.schedule(0.0)) == 1  # judge on GPU 0; GPU 1 free
    core.submit(call("big", "big", 2), 1.0)  # needs both GPUs: waits
    core.submit(call("b"), 1.0)  # joins judge's instance: needs no GPU
    (b,) = core.schedule(1.0)
    assert b.lease.action.trajectory == "b"
    assert alloc_of(b).units == (0,)
    assert [x.trajectory for x in core.queued()] == ["big"]


def test_without_slots_each_action_has_its_gpus_alone(make_core):
    core = make_core(pools(gpus=2, slots=1), policy="min")
    for i in range(3):
        core.submit(call(f"t{i}"), 0.0)
    grants = core.schedule(0.0)
    assert [alloc_of(g).units for g in grants] == [(0,), (1,)]
    assert all(alloc_of(g).epoch == 0 for g in grants)
    assert mgr(core).instances == {}


@pytest.mark.parametrize("policy", ["paper", "tangram"])
def test_elastic_policies_fill_slots_and_keep_pools_consistent(make_core, policy):
    core = make_core(pools(gpus=2, slots=3), policy=policy)
    for i in range(8):
        core.submit(call(f"t{i}"), 0.0)
    grants = core.schedule(0.0)
    assert len(grants) == 6  # two instances of three slots
    check_pools(core)
    for g in grants[:3]:
        core.release(g.lease.id, 1.0)
    assert len(core.schedule(1.0)) == 2
    check_pools(core)


def test_a_restart_restores_instances_and_their_epochs(make_core):
    core = make_core(pools(gpus=1, slots=3), policy="min")
    for t in "abc":
        core.submit(call(t), 0.0)
    leases = [g.lease for g in core.schedule(0.0)]
    epoch = leases[0].fencing_token
    # A new core (the broker restarted) takes the journal's leases back, joiners first.
    again = make_core(pools(gpus=1, slots=3), policy="min")
    for lease in reversed(leases):
        lease.allocation = {
            "gpu": allocation_in(allocation_out(lease.allocation["gpu"]))
        }  # through the journal's form
        again.restore(lease, 1.0)
    m = mgr(again)
    assert m.instances[("g", 0)].active == 3
    assert m.instances[("g", 0)].epoch == epoch
    assert m.usage() == {"g": (1, 1)}
    for lease in leases:
        again.release(lease.id, 2.0)
    assert m.usage() == {"g": (1, 0)} and m.instances == {} and m.slots == {}


def test_the_fence_orders_instances_not_the_actions_sharing_one(make_core):
    key = bytes(range(32))
    signer, fence = GrantSigner(key), Fence(key)
    core = make_core(pools(gpus=1, slots=2), policy="min")
    core.submit(call("a"), 0.0)
    core.submit(call("b"), 0.0)
    a, b = (g.lease for g in core.schedule(0.0))

    def sign(lease: Any) -> Any:
        return signer.sign(lease.id, lease.fencing_token, lease.allocation, time.time() + 60)

    ga, gb = sign(a), sign(b)
    assert gb.token_for("gpu") == ga.token_for("gpu") == a.fencing_token
    fence.admit((0,), gb, node="g", pool="gpu")
    fence.admit((0,), ga, node="g", pool="gpu")  # older lease, same instance: admitted
    # The instance ends; the next holder of GPU 0 fences both of them out.
    core.release(a.id, 1.0)
    core.release(b.id, 1.0)
    core.submit(call("c"), 2.0)
    (c,) = (g.lease for g in core.schedule(2.0))
    fence.admit((0,), sign(c), node="g", pool="gpu")
    with pytest.raises(StaleLease):
        fence.admit((0,), gb, node="g", pool="gpu")
    # The epoch is signed: changing it breaks the grant.
    forged = type(gb)(gb.lease, gb.token, gb.units, gb.expires, gb.signature, (("gpu", 99),))
    assert not signer.verify(forged)


def test_latency_follows_the_batching_curve():
    s = Service("m", 10.0, 1.0, (1,), 8, ((2, 1.2), (4, 1.5), (8, 2.5)))
    assert [s.latency_factor(n) for n in (1, 2, 3, 4, 6, 8, 16)] == pytest.approx(
        [1.0, 1.2, 1.35, 1.5, 2.0, 2.5, 2.5]
    )
    assert Service("m", 10.0, 1.0).latency_factor(5) == 1.0


# Three trajectories call the judge (10 s alone) at t = 1 on one GPU with 4 slots and a
# batching curve of 1.5x at 2 in flight and 3x at 4 (2.25x at 3, interpolated).
SLOTTED = """\
{"kind": "trajectory", "id": "t0", "task": "rm", "step": 0}
{"kind": "action", "trajectory": "t0", "gap": 1.0, "demands": {"gpu": 1}, "key": "gpu", \
"service": "judge", "duration": 10.0}
{"kind": "trajectory", "id": "t1", "task": "rm", "step": 0}
{"kind": "action", "trajectory": "t1", "gap": 1.0, "demands": {"gpu": 1}, "key": "gpu", \
"service": "judge", "duration": 10.0}
{"kind": "trajectory", "id": "t2", "task": "rm", "step": 0}
{"kind": "action", "trajectory": "t2", "gap": 1.0, "demands": {"gpu": 1}, "key": "gpu", \
"service": "judge", "duration": 10.0}
"""


@pytest.mark.parametrize("policy", ["min", "paper", "tangram", "static"])
def test_the_simulator_stretches_joiners_by_the_curve(policy):
    from tangram.sim.run import simulate
    from tangram.sim.trace import parse_lines

    config = {"pools": pools(gpus=1, slots=4, batching=[[2, 1.5], [4, 3.0]])}
    if policy == "static":  # one service per pool: the judge alone
        del config["pools"]["gpu"]["services"]["big"]
    res, runner = simulate(parse_lines(SLOTTED.splitlines()), config, policy, check=True)
    acts = sorted(r.ended - r.submitted for r in runner.runs)
    if policy == "static":  # always resident: no restore
        assert acts == pytest.approx([10.0, 15.0, 22.5])
    else:  # the first restores (2 s), the two joiners do not wait for it
        assert acts == pytest.approx([12.0, 15.0, 22.5])
    assert res["restores"] == (0 if policy == "static" else 1)


def test_bad_batching_curves_and_slots_are_refused(make_core):
    with pytest.raises(ConfigError, match="batching"):
        make_core(pools(batching=[[4, 1.5], [2, 1.2]]))
    with pytest.raises(Exception, match="max_concurrency"):
        make_core(pools(slots=0))


async def test_actions_sharing_an_instance_reach_one_engine_woken_once(make_core, tmp_path):
    """The broker's grants, signed, run on a real engine emulator process: the two
    actions of one instance each pass the executor's fence (in either order), the
    engine is woken once, and both are answered by the same instance."""
    import asyncio
    import sys

    from tangram.executors import ServiceHost, ServiceSpec, VllmEngine

    pytest.importorskip("uvicorn")
    key = bytes(range(32))
    signer = GrantSigner(key)
    cmd = [
        sys.executable, "-m", "tangram.testing.engine", "--port", "{port}", "--host", "{host}",
        "--model", "{model}", "--tensor-parallel-size", "{tp}", "--wake-delay", "0.3",
    ]  # fmt: skip
    spec = ServiceSpec("judge", engine=VllmEngine(model="m", command=cmd, startup_timeout=60))
    host = ServiceHost("g", pool="gpu", fencing_key=key)
    host.register(spec)
    try:
        core = make_core(pools(gpus=1, slots=2), policy="min")
        core.submit(call("a"), 0.0)
        core.submit(call("b"), 0.0)
        a, b = (g.lease for g in core.schedule(0.0))
        grants = {
            lease.id: signer.sign(lease.id, lease.fencing_token, lease.allocation, time.time() + 60)
            for lease in (a, b)
        }
        body = {"model": "m", "prompt": "score", "max_tokens": 2}
        first = await host.run("judge", [0], [], body, grants[a.id])  # launches it
        # Asleep again, as after an eviction (tests/test_engines.py covers those).
        inst = host.instances[("judge", 1, 0)]
        await inst.sleep(1)
        host.awake.discard(("judge", 1, 0))
        # The newer lease's call first, then the older one's: both are admitted.
        out_b, out_a = await asyncio.gather(
            host.run("judge", [0], [], body, grants[b.id]),
            host.run("judge", [0], [], body, grants[a.id]),
        )
        assert first.launched
        assert [out_b.restored, out_a.restored].count(True) == 1  # one wake for both
        assert out_a.url == out_b.url == first.url
    finally:
        host.close()


def test_an_idle_resident_instance_is_used_before_a_busy_one_is_joined(make_core):
    core = make_core(pools(gpus=2, slots=4), policy="min")
    core.submit(call("a"), 0.0)
    core.submit(call("b"), 0.0)
    core.submit(call("c"), 0.0)
    grants = core.schedule(0.0)  # a opens GPU 0, b and c join it
    assert {alloc_of(g).units for g in grants} == {(0,)}
    core.submit(call("d"), 0.0)
    grants2 = core.schedule(0.0)
    # d joins too: GPU 1 holds nothing resident, and without a batching curve a free
    # slot beats a restore.
    assert {alloc_of(g).units for g in grants2} == {(0,)}
    for g in grants + grants2:
        core.release(g.lease.id, 1.0)
    # Judge resident on GPU 0 and idle; warm on GPU 1 too after one more instance there.
    m = mgr(core)
    m._place(m.services["judge"], 1, "g", 1)
    core.submit(call("f"), 2.0)
    core.submit(call("g"), 2.0)
    f, g = core.schedule(2.0)
    # f opens the idle instance on GPU 0; g takes the idle one on GPU 1 rather than
    # joining f: no restore and no batching either way.
    assert (alloc_of(f).units, alloc_of(f).restore) == ((0,), False)
    assert (alloc_of(g).units, alloc_of(g).restore, alloc_of(g).epoch) == ((1,), False, 0)


def test_with_a_curve_a_restore_is_paid_only_when_it_costs_less_than_batching(make_core):
    # 10 s calls, restore 2 s: joining a third (x1.3) costs 3 s more than alone, a
    # restore 2 s; the second (x1.1, 1 s more) joins.
    core = make_core(pools(gpus=2, slots=4, batching=[[2, 1.1], [3, 1.3]]), policy="min")
    for t in "abc":
        core.submit(call(t), 0.0)
    a, b, c = core.schedule(0.0)
    assert [alloc_of(x).units for x in (a, b, c)] == [(0,), (0,), (1,)]
    assert alloc_of(c).restore and not alloc_of(b).restore
