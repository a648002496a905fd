"""Host RAM for sleeping engines (the GPU manager's cost model and what it tells the
executor): an evicted variant sleeps with its weights in host RAM (level 1) while they
fit there, else drops them (level 2) and its next start pays ``reload_seconds``;
pre-launched services reserve host RAM for an instance on every chunk."""

from __future__ import annotations

import sys
from typing import Any

import httpx
import pytest

from tangram.core.managers.gpu import GpuManager
from tangram.kinds.base import ConfigError
from tangram.spec import Action, Resident


def pools(host_gb: float | None = 100.0, **over: Any) -> dict[str, Any]:
    svc = {"memory_gb": 64.0, "restore_seconds": 1.0, "reload_seconds": 10.0}
    node: dict[str, Any] = {"name": "g", "gpus": 1, "memory_gb": 80.0}
    if host_gb is not None:
        node["host_memory_gb"] = host_gb
    return {
        "gpu": {
            "kind": "gpu",
            "nodes": [node],
            "services": {n: {**svc, **over.get(n, {})} for n in ("a", "b", "c")},
        }
    }


def run(core: Any, service: str, now: float) -> Any:
    core.submit(Action.build(f"t-{service}-{now}", {"gpu": 1}, service=service, duration=1.0), now)
    (g,) = core.schedule(now)
    mgr = core.pools["gpu"]
    cost = mgr.held_cost(g.lease.action, g.lease.allocation["gpu"])
    core.release(g.lease.id, now + 1)
    return g.lease.allocation["gpu"], cost


def test_evicted_variants_sleep_in_host_ram_while_it_has_room(make_core):
    core = make_core(pools(100.0), policy="min")
    mgr = core.pools["gpu"]
    assert isinstance(mgr, GpuManager)
    _, cost = run(core, "a", 0.0)
    assert cost == 10.0  # never started: its weights are loaded
    b1, cost = run(core, "b", 2.0)
    assert b1.evicts == (Resident("a", 1, "g", 0, 1),)  # a's 64 GB fit in 100
    assert cost == 10.0 and mgr.host_used["g"] == 64.0
    a2, cost = run(core, "a", 4.0)
    # a wakes from host RAM (1 s) and leaves it; b takes its place there.
    assert cost == 1.0 and a2.evicts == (Resident("b", 1, "g", 0, 1),)
    assert list(mgr.sleeping["g"]) == [("b", 1, 0)]
    c1, _ = run(core, "c", 6.0)
    # No room for a beside b (128 > 100): a drops its weights...
    assert c1.evicts == (Resident("a", 1, "g", 0, 2),)
    _, cost = run(core, "a", 8.0)
    assert cost == 10.0  # ...and pays the reload when it comes back
    # The scheduler planned with the same costs: b sleeps in host RAM, c does not.
    probe = Action.build("p", {"gpu": 1}, service="b", duration=1.0)
    assert mgr.extra_cost(probe, 1) == 1.0
    probe_c = Action.build("p", {"gpu": 1}, service="c", duration=1.0)
    assert mgr.extra_cost(probe_c, 1) == 10.0


def test_without_host_ram_accounting_levels_are_left_to_the_executor(make_core):
    core = make_core(pools(None), policy="min")
    run(core, "a", 0.0)
    b1, cost = run(core, "b", 2.0)
    assert b1.evicts == (Resident("a", 1, "g", 0),) and b1.evicts[0].level == 0
    assert cost == 1.0  # every restore costs restore_seconds, as before


def test_pre_launched_instances_reserve_host_ram_and_always_wake_from_it(make_core):
    core = make_core(pools(200.0, a={"launch": "pre-launched"}), policy="min")
    mgr = core.pools["gpu"]
    assert mgr.host_reserved["g"] == 64.0
    _, cost = run(core, "a", 0.0)
    assert cost == 1.0  # asleep from the start: a wake, not a load
    b1, _ = run(core, "b", 2.0)
    assert b1.evicts == (Resident("a", 1, "g", 0, 1),)
    assert mgr.host_used["g"] == 0.0  # a's room was reserved, not taken again
    with pytest.raises(ConfigError, match=r"pre-launched instances \(a, b: one per chunk\)"):
        make_core(pools(100.0, a={"launch": "pre-launched"}, b={"launch": "pre-launched"}))


def test_measured_reloads_and_wakes_are_learned_apart(make_core):
    core = make_core(pools(100.0), policy="min")
    core.observe("gpu", "reload_seconds", "a", 20.0, 0.0)
    core.observe("gpu", "restore_seconds", "a", 3.0, 0.0)
    svc = core.pools["gpu"].services["a"]
    assert svc.reload_seconds == pytest.approx(0.8 * 10 + 0.2 * 20)
    assert svc.restore_seconds == pytest.approx(0.8 * 1 + 0.2 * 3)


async def test_the_executor_sleeps_each_instance_as_deep_as_the_broker_says(tmp_path):
    from tangram.executors import ServiceHost, ServiceSpec, VllmEngine

    pytest.importorskip("uvicorn")
    cmd = [
        sys.executable, "-m", "tangram.testing.engine", "--port", "{port}", "--host", "{host}",
        "--model", "{model}", "--tensor-parallel-size", "{tp}",
    ]  # fmt: skip
    host = ServiceHost("g", trusted=True)
    for name in ("a", "b"):
        host.register(ServiceSpec(name, engine=VllmEngine(model=name, command=cmd)))
    body = {"prompt": "x", "max_tokens": 1}
    try:
        await host.run("a", [0], [], {**body, "model": "a"})
        await host.run("b", [1], [], {**body, "model": "b"})
        # The broker evicts a at level 2 (no room in host RAM), b at level 1.
        await host.release([Resident("a", 1, "g", 0, 2), Resident("b", 1, "g", 1, 1)])
        levels = {
            k: httpx.get(inst.url + "/info").json()["sleep_level"]
            for k, inst in host.instances.items()
        }
        assert levels == {("a", 1, 0): 2, ("b", 1, 1): 1}
        again = await host.run("a", [0], [], {**body, "model": "a"})
        assert again.restored and again.woke_from == 2  # reported as a reload
        again = await host.run("b", [1], [], {**body, "model": "b"})
        assert again.restored and again.woke_from == 1
    finally:
        host.close()


def test_a_chunk_where_the_variant_sleeps_in_host_ram_is_preferred(make_core):
    cfg = pools(500.0)
    cfg["gpu"]["nodes"][0]["gpus"] = 2
    core = make_core(cfg, policy="min")
    mgr = core.pools["gpu"]
    run(core, "b", 0.0)  # b on GPU 0
    # c on GPU 1, then a on GPU 1: c sleeps there with its weights in host RAM.
    core.submit(Action.build("hold", {"gpu": 1}, service="b", duration=1.0), 1.0)
    (hold,) = core.schedule(1.0)  # b busy on GPU 0
    run(core, "c", 2.0)
    run(core, "a", 4.0)
    assert ("c", 1, 1) in mgr.sleeping["g"]
    core.release(hold.lease.id, 5.0)
    # Both GPUs free; c is resident on neither, asleep in host RAM on GPU 1: it goes
    # there (a 1 s wake), not to GPU 0 (a 10 s reload).
    alloc, cost = run(core, "c", 6.0)
    assert alloc.units == (1,) and cost == 1.0
