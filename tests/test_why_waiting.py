"""Why a queued action waits (``Core.why_waiting``, each manager's ``why``), and the
``waiting`` object the HTTP API answers for a queued action."""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest

from tangram.config import parse_config
from tangram.server import LiveServer, create_app
from tangram.spec import Action


def cpu_pool(*nodes: tuple[str, int, float]) -> dict[str, Any]:
    return {
        "cpu": {
            "kind": "cpu",
            "nodes": [{"name": n, "cores": c, "memory_gb": m} for n, c, m in nodes],
        }
    }


def state(core) -> Any:
    """What a query must leave alone: the queue, leases and every pool's free state."""
    return (
        [a.id for a in core.queued()],
        sorted(core.leases),
        copy.deepcopy(core.snapshot(0.0)["pools"]),
    )


# --------------------------------------------------------------------------- cpu


def test_cpu_pinned_action_names_its_node_free_cores_and_those_ahead(make_core):
    core = make_core(cpu_pool(("n0", 8, 64), ("n1", 8, 64)), policy="min")
    core.submit(Action.build("t", {"cpu": 5}), 0.0)  # pins t to n0 (first best node)
    (g,) = core.schedule(0.0)
    node = g.lease.allocation["cpu"].node
    ahead = core.submit(Action.build("t", {"cpu": 4}), 1.0)
    me = core.submit(Action.build("t", {"cpu": 8}), 1.0)
    assert core.schedule(1.0) == []
    before = state(core)
    why = core.why_waiting(me.id, 1.0)
    assert state(core) == before  # read only
    assert why is not None
    assert why["pool"] == "cpu" and why["reason"] == "insufficient_units"
    assert (why["node"], why["needs"], why["free"], why["ahead"]) == (node, 8, 3, 1)
    assert f"node {node} has 3 of the 8 cores it needs free" in why["message"]
    assert "1 action ahead of it wait on that node" in why["message"]
    first = core.why_waiting(ahead.id, 1.0)
    assert first is not None and first["ahead"] == 0 and first["free"] == 3


def test_cpu_behind_an_earlier_waiter_on_its_node(make_core):
    core = make_core(cpu_pool(("n", 4, 64)), policy="min")
    core.submit(Action.build("t1", {"cpu": 2}), 0.0)
    core.schedule(0.0)
    big = core.submit(Action.build("t2", {"cpu": 4}), 1.0)
    small = core.submit(Action.build("t3", {"cpu": 1}), 1.0)
    assert core.schedule(1.0) == []  # 2 cores free, but t2 came first (FCFS)
    why = core.why_waiting(small.id, 1.0)
    assert why is not None and why["reason"] == "behind_earlier_action"
    assert why["pool"] == "cpu" and why["ahead"] == 1
    assert core.why_waiting(big.id, 1.0)["reason"] == "insufficient_units"  # type: ignore[index]


def test_ahead_follows_the_walk_of_tangrams_order(make_core):
    # Under tangram a shorter action queued later is walked first, until the longer one
    # is overdue: ``ahead`` counts what the round walks before, not what came earlier.
    core = make_core(cpu_pool(("n", 4, 64)), policy="tangram:overdue=5,grain=1")
    core.submit(Action.build("t1", {"cpu": 4}, duration=100.0), 0.0)
    core.schedule(0.0)
    long = core.submit(Action.build("t2", {"cpu": 1}, duration=50.0), 1.0)
    short = core.submit(Action.build("t3", {"cpu": 1}, duration=1.0), 2.0)
    assert core.schedule(2.0) == []
    why_long = core.why_waiting(long.id, 2.0)
    why_short = core.why_waiting(short.id, 2.0)
    assert why_long is not None and why_short is not None
    assert (why_long["ahead"], why_short["ahead"]) == (1, 0)
    assert "1 action ahead of it wait on that node" in why_long["message"]
    # At t=6 the long one is overdue (queued 5 s): it is walked first again.
    why_long, why_short = core.why_waiting(long.id, 6.0), core.why_waiting(short.id, 6.0)
    assert why_long is not None and why_short is not None
    assert (why_long["ahead"], why_short["ahead"]) == (0, 1)


def test_cpu_new_trajectory_without_memory_anywhere(make_core):
    core = make_core(cpu_pool(("n0", 8, 16), ("n1", 8, 16)), policy="min")
    for t in ("a", "b"):
        core.submit(Action.build(t, {"cpu": 1}, memory_gb=12), 0.0)
    assert len(core.schedule(0.0)) == 2
    me = core.submit(Action.build("c", {"cpu": 1}, memory_gb=8), 1.0)
    assert core.schedule(1.0) == []
    why = core.why_waiting(me.id, 1.0)
    assert why is not None and why["reason"] == "memory" and why["pool"] == "cpu"
    assert "8 GB" in why["message"] and "n0 4 GB" in why["message"]


def test_not_queued_is_none_and_a_free_action_waits_only_for_the_next_round(make_core):
    core = make_core(cpu_pool(("n", 4, 64)))
    a = core.submit(Action.build("t", {"cpu": 1}), 0.0)
    assert core.why_waiting(a.id, 0.0)["reason"] == "next_round"  # type: ignore[index]
    (g,) = core.schedule(0.0)
    assert core.why_waiting(a.id, 0.0) is None
    assert core.why_waiting("nope", 0.0) is None
    core.release(g.lease.id, 1.0)


def test_held_after_restart(make_core):
    core = make_core(cpu_pool(("n", 4, 64)))
    core.hold_until = 30.0
    a = core.submit(Action.build("t", {"cpu": 1}), 10.0)
    assert core.schedule(10.0) == []
    why = core.why_waiting(a.id, 10.0)
    assert why is not None and why["reason"] == "held_after_restart"
    assert why["ready_at"] == 30.0 and "20 s" in why["message"]


# --------------------------------------------------------------------------- quota


def test_quota_rate_names_the_limit_and_when_it_can_be_admitted(make_core):
    core = make_core({"api": {"kind": "quota", "rate": {"per_second": 2, "burst": 1}}})
    core.submit(Action.build("t1", {"api": 1}), 0.0)
    assert len(core.schedule(0.0)) == 1
    me = core.submit(Action.build("t2", {"api": 1}), 0.1)
    assert core.schedule(0.1) == []
    before = state(core)
    why = core.why_waiting(me.id, 0.1)
    assert state(core) == before
    assert why is not None and why["pool"] == "api"
    assert why["reason"] == "rate_limited" and why["limit"] == "rate"
    assert why["ready_at"] == pytest.approx(0.5)  # 0.2 permits at 2/s: 0.4 s more
    assert why["needs"] == 1 and why["free"] == pytest.approx(0.2)
    assert "admitted in 0.4 s" in why["message"]


def test_quota_window_and_tokens(make_core):
    core = make_core(
        {"api": {"kind": "quota", "window": {"limit": 1, "seconds": 10}, "tokens_per_minute": 600}}
    )
    core.submit(Action.build("t1", {"api": 1}, tokens=100), 0.0)
    assert len(core.schedule(0.0)) == 1
    me = core.submit(Action.build("t2", {"api": 1}, tokens=100), 1.0)
    assert core.schedule(1.0) == []
    why = core.why_waiting(me.id, 1.0)
    assert why is not None and why["limit"] == "window"
    assert why["ready_at"] == pytest.approx(10.0)

    core2 = make_core({"api": {"kind": "quota", "tokens_per_minute": 600}})
    core2.submit(Action.build("t1", {"api": 1}, tokens=550), 0.0)
    assert len(core2.schedule(0.0)) == 1
    me2 = core2.submit(Action.build("t2", {"api": 1}, tokens=100), 0.0)
    assert core2.schedule(0.0) == []
    why2 = core2.why_waiting(me2.id, 0.0)
    assert why2 is not None and why2["limit"] == "tokens" and why2["needs"] == 100
    assert why2["ready_at"] == pytest.approx(5.0)  # 50 tokens at 10/s


def test_quota_concurrency_is_units_not_a_rate(make_core):
    core = make_core({"api": {"kind": "quota", "concurrency": 1}})
    core.submit(Action.build("t1", {"api": 1}), 0.0)
    core.schedule(0.0)
    me = core.submit(Action.build("t2", {"api": 1}), 0.0)
    later = core.submit(Action.build("t3", {"api": 1}), 0.0)
    core.schedule(0.0)
    why = core.why_waiting(me.id, 0.0)
    assert why is not None and why["reason"] == "insufficient_units"
    assert why["limit"] == "concurrency" and "ready_at" not in why
    assert core.why_waiting(later.id, 0.0)["ahead"] == 1  # type: ignore[index]


# --------------------------------------------------------------------------- gpu


def test_gpu_no_free_chunk_of_the_size(make_core):
    pools = {
        "gpu": {
            "kind": "gpu",
            "nodes": [{"name": "g", "gpus": 4, "memory_gb": 80}],
            "services": {},
        }
    }
    core = make_core(pools, policy="min")
    core.submit(Action.build("t1", {"gpu": 1}), 0.0)
    assert len(core.schedule(0.0)) == 1
    me = core.submit(Action.build("t2", {"gpu": 4}), 0.0)
    small = core.submit(Action.build("t3", {"gpu": 1}), 0.0)
    assert core.schedule(0.0) == []
    why = core.why_waiting(me.id, 0.0)
    assert why is not None and why["pool"] == "gpu" and why["reason"] == "insufficient_units"
    assert (why["needs"], why["free"]) == (4, 3)
    assert "aligned chunk of 4" in why["message"]
    behind = core.why_waiting(small.id, 0.0)
    assert behind is not None and behind["reason"] == "behind_earlier_action"


# --------------------------------------------------------------------------- HTTP


async def test_get_of_a_queued_action_says_why_it_waits() -> None:
    pools = {
        **cpu_pool(("n", 2, 8)),
        "api": {"kind": "quota", "rate": {"per_second": 1, "burst": 1}},
    }
    cfg = parse_config({"pools": pools, "lease_ttl_seconds": 30})
    with LiveServer(create_app(cfg)) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post("/v1/actions", json={"trajectory": "t", "demands": {"cpu": 2}})
            assert r.status_code == 200, r.text
            assert "waiting" not in r.json()
            r = await http.post("/v1/actions", json={"trajectory": "t", "demands": {"cpu": 1}})
            assert r.status_code == 202
            body = r.json()
            assert body["waiting"]["reason"] == "insufficient_units"
            got = (await http.get(f"/v1/actions/{body['id']}")).json()
            assert got["state"] == "queued"
            w = got["waiting"]
            assert (w["pool"], w["node"], w["needs"], w["free"]) == ("cpu", "n", 1, 0)
            assert "node n has 0 of the 1 cores it needs free" in w["message"]

            r = await http.post("/v1/actions", json={"trajectory": "u", "demands": {"api": 1}})
            assert r.status_code == 200
            r = await http.post("/v1/actions", json={"trajectory": "v", "demands": {"api": 1}})
            assert r.status_code == 202
            w = (await http.get(f"/v1/actions/{r.json()['id']}")).json()["waiting"]
            assert (w["pool"], w["reason"], w["limit"]) == ("api", "rate_limited", "rate")
            assert time.time() - 1 < w["ready_at"] < time.time() + 2  # Unix time
