"""The modelled baselines on tiny hand-built traces: k8s-pod's placement (the default
kube-scheduler's scoring against packing), start-up rate, exec cost and CPU limit with
the action's own efficiency curve; client-bucket's per-worker share of an API's limits."""

from __future__ import annotations

from typing import Any

import pytest

from tangram.sim.baselines.client_bucket import bucket_params
from tangram.sim.baselines.k8s_pod import (
    GIB,
    PodExecutor,
    node_scores,
    pick_node,
    pod_params,
    speed,
)
from tangram.sim.engine import Runner
from tangram.sim.run import check_policy, simulate
from tangram.sim.trace import parse_lines
from tangram.spec import Action, Amdahl, Demand

# Only what each test is about: no exec cost, no start-up rate limit.
BARE = "k8s-pod:exec=0,startup_rate=0"


def _trace(*trajs: list[str]) -> list[Any]:
    """Trajectories t0, t1... each with the given action lines (JSON objects' bodies)."""
    lines = []
    for i, acts in enumerate(trajs):
        lines.append(f'{{"kind": "trajectory", "id": "t{i}"}}')
        lines += [f'{{"kind": "action", "trajectory": "t{i}", {a}}}' for a in acts]
    return parse_lines(lines)


def _cpu(nodes: int, cores: int, memory_gb: float = 64) -> dict[str, Any]:
    node = {"name": "n", "count": nodes, "cores": cores, "memory_gb": memory_gb}
    return {"pools": {"cpu": {"kind": "cpu", "nodes": [node]}}}


TOOL = '"gap": 0, "demands": {"cpu": 1}, "duration": 1.0'


def _pods(policy: str, trajs: list[Any], pools: dict[str, Any]) -> tuple[dict[str, Any], Runner]:
    res, runner = simulate(trajs, pools, policy)
    assert isinstance(runner.executor, PodExecutor)
    return res, runner


# ---------------------------------------------------------------- placement


def test_spread_puts_two_pods_on_two_empty_nodes_where_pack_stacks_them() -> None:
    trajs = _trace([TOOL], [TOOL])
    _, spread = _pods(BARE, trajs, _cpu(2, 4))
    _, pack = _pods(BARE.replace("k8s-pod:", "k8s-pod:pack,"), trajs, _cpu(2, 4))
    assert spread.executor.placed == [(0, 0), (1, 1)]  # type: ignore[attr-defined]
    assert pack.executor.placed == [(0, 0), (1, 0)]  # type: ignore[attr-defined]


def test_node_scores_match_the_plugins_formulas_by_hand() -> None:
    # A pod of 500m CPU and 4 GiB on 4-CPU, 16 GiB nodes.
    # Node 0, empty: LeastAllocated cpu (4000 - 500) * 100 // 4000 = 87, memory
    #   (16 - 4) * 100 // 16 = 75, mean 162 // 2 = 81; BalancedAllocation fractions
    #   0.125 and 0.25, std 0.0625, int(93.75) = 93. Total 174.
    # Node 1, 1500m and 8 GiB requested: cpu 2000 left of 4000 -> 50, memory 4 of 16
    #   -> 25, 75 // 2 = 37; fractions 0.5 and 0.75, std 0.125, int(87.5) = 87. Total 124.
    # Node 2, 3800m requested: 500m more does not fit.
    alloc = [(4000, 16 * GIB)] * 3
    req = [(0, 0), (1500, 8 * GIB), (3800, 0)]
    scores = node_scores(500, 4 * GIB, req, alloc)
    assert scores == [174, 124, None]
    assert pick_node(scores) == 0
    # A pod requesting no memory: LeastAllocated counts 200 MiB (the scheduler's
    # non-zero default), BalancedAllocation counts nothing: empty 4-CPU, 16 GiB node:
    # cpu 87, memory (16 GiB - 200 MiB) * 100 // 16 GiB = 98, 185 // 2 = 92;
    # fractions 0.125 and 0, std 0.0625 -> 93. Total 185.
    assert node_scores(500, 0, [(0, 0)], [(4000, 16 * GIB)]) == [185]
    # Ties go to the first node; nothing fits: None.
    assert pick_node([150, 170, 170]) == 1
    assert pick_node([None, None]) is None


def test_spread_prefers_the_node_with_more_free_in_proportion() -> None:
    # A 500m pod without memory request on a 4-core and an 8-core node (64 GiB each):
    # small: cpu 87, memory 99 (200 MiB counted), 186 // 2 = 93, balanced 93: 186;
    # big: cpu 93, memory 99, 96, balanced (0.0625 vs 0) 96: 192. The bigger node wins.
    pools = {
        "pools": {
            "cpu": {
                "kind": "cpu",
                "nodes": [
                    {"name": "small", "cores": 4, "memory_gb": 64},
                    {"name": "big", "cores": 8, "memory_gb": 64},
                ],
            }
        }
    }
    _, runner = _pods(BARE, _trace([TOOL]), pools)
    assert runner.executor.placed == [(0, 1)]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- start-up and exec


def test_the_startup_rate_delays_the_pod_after_the_burst_by_one_over_the_rate() -> None:
    # Four pods bound at t=0; 2 pods/s with a burst of 3: three are ready at 5 s (the
    # start-up delay), the fourth 1/2 s later.
    trajs = _trace(*([TOOL] for _ in range(4)))
    _, runner = _pods("k8s-pod:exec=0,startup_rate=2,startup_burst=3", trajs, _cpu(1, 8))
    assert [r.started for r in runner.runs] == [5.0, 5.0, 5.0, 5.5]
    # Burst 1 (the default): evenly spaced, 1/rate apart.
    _, runner = _pods("k8s-pod:exec=0,startup_rate=4", trajs, _cpu(1, 8))
    assert [r.started for r in runner.runs] == [5.0, 5.25, 5.5, 5.75]


def test_the_exec_cost_adds_exactly_its_value_to_each_action() -> None:
    acts = [TOOL, '"gap": 0.5, "demands": {"cpu": 1}, "duration": 2.0']
    trajs = _trace(acts, acts)
    _, bare = _pods(BARE, trajs, _cpu(2, 4))
    _, paid = _pods("k8s-pod:exec=0.25,startup_rate=0", trajs, _cpu(2, 4))
    act = [r.ended - r.submitted for r in bare.runs]
    assert [r.ended - r.submitted for r in paid.runs] == [a + 0.25 for a in act]
    assert [r.setup_s for r in paid.runs] == [0.25] * 4
    assert [r.exec_s for r in paid.runs] == [r.exec_s for r in bare.runs]


# ---------------------------------------------------------------- CPU limit and curves

TEST = '"gap": 0, "demands": {"cpu": {"min": 1, "max": 32}}, "key": "cpu", "duration": 30.0, '


def test_an_elastic_test_in_a_pod_runs_at_its_curve_at_the_limit() -> None:
    trajs = _trace([TEST + '"efficiency": {"amdahl": 0.9}'])
    _, runner = _pods(BARE, trajs, _cpu(1, 64))
    action = Action(
        "x", {"cpu": Demand.range(1, 32)}, key="cpu", duration=30.0, efficiency=Amdahl(0.9)
    )
    at_limit = action.duration_at(4) or 0.0
    (run,) = runner.runs
    assert run.units == 4
    assert run.exec_s == pytest.approx(at_limit, rel=1e-12)
    assert run.ended - run.submitted == pytest.approx(5.0 + at_limit, rel=1e-12)


def test_contended_tests_slow_down_by_their_curve_not_linearly() -> None:
    # Two 4-core tests (limit 4) on one 4-core node: each gets 2 cores, so each runs as
    # fast as its curve says 2 cores run: duration_at(2), here 30 * S(1) / S(2) with
    # Amdahl 0.5, 30 / (4/3) = 22.5 s. (Slowing down in proportion to the cores lost
    # would give duration_at(4) * 4 / 2 = 30 / 1.6 * 2 = 37.5 s.)
    trajs = _trace(*([TEST + '"efficiency": {"amdahl": 0.5}'] for _ in range(2)))
    _, runner = _pods(BARE, trajs, _cpu(1, 4))
    action = Action(
        "x", {"cpu": Demand.range(1, 32)}, key="cpu", duration=30.0, efficiency=Amdahl(0.5)
    )
    assert [r.exec_s for r in runner.runs] == pytest.approx([action.duration_at(2)] * 2)
    assert action.duration_at(2) == pytest.approx(22.5)


def test_speed_on_a_share_of_cores() -> None:
    amdahl = Amdahl(0.5)
    assert speed(amdahl, 0.5) == pytest.approx(0.5)  # time-sliced: the share itself
    assert speed(amdahl, 2.0) == pytest.approx(amdahl.speedup(2))
    assert speed(amdahl, 3.0) == pytest.approx(1 / (0.5 + 0.5 / 3))
    assert speed(None, 3.0) == 3.0


# ---------------------------------------------------------------- options


def test_options_parse_and_bad_ones_are_refused() -> None:
    p = pod_params("k8s-pod:pack,exec=0.05,startup_rate=20,startup_burst=4,limit=8")
    assert (p.placement, p.exec_s, p.startup_rate, p.startup_burst, p.limit) == (
        "pack",
        0.05,
        20.0,
        4,
        8,
    )
    assert pod_params("k8s-pod").placement == "spread"
    assert bucket_params("client-bucket:hang=0,workers=8").workers == 8
    for name in ("k8s-pod:pack", "k8s-pod:exec=0", "client-bucket", "client-bucket:hang=1"):
        check_policy(name)
    for bad in ("k8s-pod:fast", "k8s-pod:exec=-1", "k8s-pod:limit=0", "client-bucket:hang=2"):
        with pytest.raises(ValueError, match="policy"):
            check_policy(bad)


# ---------------------------------------------------------------- client-bucket

# An API allowing 4 calls per 10 s (sliding window), no concurrency limit.
API = {"pools": {"api": {"kind": "quota", "window": {"limit": 4, "seconds": 10}}}}
CALL = '"gap": 0, "demands": {"api": 1}, "duration": 0.5'


def test_client_bucket_never_exceeds_its_share_in_any_window() -> None:
    # Two workers, each with a share of 2 calls per 10 s, each calling 6 times at once.
    trajs = _trace([CALL] * 6, [CALL] * 6)
    res, runner = simulate(trajs, API, "client-bucket")
    assert res["quota_violations"] == 0 and res["failed_actions"] == 0
    for traj in (0, 1):
        calls = sorted(r.started for r in runner.runs if r.traj == traj)  # admitted at
        assert len(calls) == 6
        # No three calls of one worker within 10 s: at most its share of 2 per window.
        assert all(b - a >= 10.0 - 1e-9 for a, b in zip(calls, calls[2:], strict=False))
    naive, _ = simulate(trajs, API, "naive-api", seed=0)
    assert naive["quota_violations"] > 0  # the same calls unpaced go over the limit


def test_client_bucket_leaves_quota_unused_when_few_workers_call() -> None:
    # One worker calls 6 times, the other once: the first still gets only half the
    # quota (calls 5 s apart: the last at 25 s), and ends later than under the broker,
    # which lets it use the whole window (calls at 0, 0.5 and 1 s, the rest from 10 s).
    trajs = _trace([CALL] * 6, [CALL])
    bucket, _ = simulate(trajs, API, "client-bucket")
    broker, _ = simulate(trajs, API, "tangram")
    assert bucket["quota_violations"] == broker["quota_violations"] == 0
    assert bucket["step_mean_s"] > broker["step_mean_s"]
    assert bucket["api_use"]["api"]["calls"] == 7
    assert broker["step_mean_s"] == 11.5 and bucket["step_mean_s"] == 25.5
    # 7 calls in 25.5 s against 4 per 10 s allowed.
    assert bucket["api_use"]["api"]["window_use"] == pytest.approx(7 / (0.4 * 25.5))
