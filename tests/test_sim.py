"""The simulator: exact results on a hand-computed trace, determinism, trace round trip
and errors, capacity invariants while simulating, and the baselines' basic behaviour."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tangram.sim import executor
from tangram.sim.engine import Runner, SimulationStuck
from tangram.sim.provider import Provider
from tangram.sim.run import lower_bounds, simulate
from tangram.sim.trace import TraceError, dump_lines, parse_lines, read_trace, write_trace
from tangram.sim.workloads import WORKLOADS, generate

ONE_POOL: dict[str, Any] = {
    "pools": {"cpu": {"kind": "cpu", "nodes": [{"name": "n", "cores": 4, "memory_gb": 8}]}}
}

# Two trajectories on one 4-core pool. Both submit an elastic action (1-4 cores, 8 s on
# one core, perfectly parallel) at t=1; t1 then waits 2 s and runs a 3 s one-core tool.
TINY = """\
{"kind": "trajectory", "id": "t0", "task": "coding", "step": 0}
{"kind": "action", "trajectory": "t0", "gap": 1.0, "demands": {"cpu": {"min": 1, "max": 4}}, \
"key": "cpu", "duration": 8.0, "efficiency": {"amdahl": 1.0}}
{"kind": "trajectory", "id": "t1", "task": "coding", "step": 0}
{"kind": "action", "trajectory": "t1", "gap": 1.0, "demands": {"cpu": {"min": 1, "max": 4}}, \
"key": "cpu", "duration": 8.0, "efficiency": {"amdahl": 1.0}}
{"kind": "action", "trajectory": "t1", "gap": 2.0, "demands": {"cpu": 1}, "duration": 3.0}
"""


def _acts(policy: str) -> tuple[list[float], dict[str, Any]]:
    res, runner = simulate(parse_lines(TINY.splitlines()), ONE_POOL, policy, check=True)
    return [r.ended - r.submitted for r in runner.runs], res


def test_tiny_trace_under_min_runs_everything_at_one_core() -> None:
    # Both elastic actions get 1 core at t=1 and end at 9 (ACT 8); the tool is submitted
    # at 11 and ends at 14, which ends the step.
    acts, res = _acts("min")
    assert acts == [8.0, 8.0, 3.0]
    assert res["step_durations_s"] == [14.0]
    assert res["act_mean_s"] == pytest.approx(19 / 3)


def test_tiny_trace_under_tangram_splits_the_cores_evenly() -> None:
    # The DP minimises 8/a + 8/b with a + b = 4: two cores each, both end at 5 (ACT 4).
    # Deferring the second (head on 4 cores ends at 3, the other on 2 cores at 3 + 4 = 7:
    # total 2 + 6 = 8) is no strict improvement, so both run. The tool: 7 -> 10.
    acts, res = _acts("tangram")
    assert acts == [4.0, 4.0, 3.0]
    assert res["step_durations_s"] == [10.0]
    assert res["queue_mean_s"] == 0.0


def test_lower_bounds_of_the_tiny_trace_are_hand_computed() -> None:
    # Fastest executions: each elastic action on 4 cores, 8 / 4 = 2 s; the tool 3 s.
    # ACT bound: (2 + 2 + 3) / 3. Step bound: t0 is 1 + 2 = 3 s long, t1 1 + 2 + 2 + 3
    # = 8 s; the step is the longer. Every policy's figures are at least these.
    trajs = parse_lines(TINY.splitlines())
    assert lower_bounds(trajs, ONE_POOL) == {
        "act_lower_bound_s": pytest.approx(7 / 3),
        "step_lower_bound_s": 8.0,
    }
    # A pool of 2-core nodes: no allocation spans nodes, so the fastest is 8 / 2 = 4 s.
    two = {"pools": {"cpu": {"kind": "cpu", "nodes": [{"cores": 2, "count": 2}]}}}
    assert lower_bounds(trajs, two)["step_lower_bound_s"] == 1 + 4 + 2 + 3
    for policy in ("min", "tangram", "fixed:2"):
        _, res = _acts(policy)
        assert res["act_lower_bound_s"] == pytest.approx(7 / 3)
        assert res["act_mean_s"] >= res["act_lower_bound_s"]
        assert res["step_mean_s"] >= res["step_lower_bound_s"] == 8.0


def test_same_seed_gives_the_same_results() -> None:
    pools = WORKLOADS["deepsearch"].pools
    a, _ = simulate(generate("deepsearch", 48, 2, 7), pools, "tangram")
    b, _ = simulate(generate("deepsearch", 48, 2, 7), pools, "tangram")
    c, _ = simulate(generate("deepsearch", 48, 2, 8), pools, "tangram")
    for r in (a, b, c):
        for k in ("wall_s", "sched_wall_s", "sched_overhead_mean_s"):
            r.pop(k, None)
    assert a == b
    assert a != c


def test_trace_round_trip_gives_identical_results(tmp_path: Path) -> None:
    trajs = generate("mopd", 32, 2, 3)
    path = tmp_path / "t.jsonl"
    write_trace(path, trajs)
    again = read_trace(path)
    assert list(dump_lines(again)) == list(dump_lines(trajs))
    pools = WORKLOADS["mopd"].pools
    for policy in ("tangram", "static"):
        a, _ = simulate(trajs, pools, policy)
        b, _ = simulate(again, pools, policy)
        for r in (a, b):
            for k in ("wall_s", "sched_wall_s", "sched_overhead_mean_s"):
                r.pop(k, None)
        assert a == b


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2:"),
        (
            '{"kind": "action", "trajectory": "nope", "demands": {"cpu": 1}, "duration": 1}',
            "before",
        ),
        ('{"kind": "action", "trajectory": "t0", "demands": {"cpu": 1}}', "'duration' is required"),
        (
            '{"kind": "action", "trajectory": "t0", "demands": {"cpu": 0}, "duration": 1}',
            "positive",
        ),
        (
            '{"kind": "action", "trajectory": "t0", "demands": {"cpu": 1}, "duration": -1}',
            "non-neg",
        ),
        ('{"kind": "thing"}', "'kind' must be"),
        ('{"kind": "trajectory", "id": "t0"}', "defined twice"),
        (
            '{"kind": "action", "trajectory": "t0", "gap": 1, "demands": {"cpu": 1}, '
            '"duration": 1, "efficiency": {"amdahl": 2}}',
            "parallel fraction",
        ),
    ],
)
def test_malformed_lines_are_reported_with_their_line_number(line: str, message: str) -> None:
    text = '{"kind": "trajectory", "id": "t0"}\n' + line + "\n"
    with pytest.raises(TraceError) as err:
        parse_lines(text.splitlines(), "x.jsonl")
    assert str(err.value).startswith("x.jsonl: line 2:")
    assert message in str(err.value)


def test_unknown_fields_are_ignored() -> None:
    text = (
        '{"kind": "trajectory", "id": "t0", "colour": "blue"}\n'
        '{"kind": "action", "trajectory": "t0", "demands": {"cpu": 1}, "duration": 1, "x": 1}\n'
    )
    (t,) = parse_lines(text.splitlines())
    assert t.actions[0].duration == 1.0


@pytest.mark.parametrize(
    ("workload", "policies"),
    [
        ("coding", ["tangram", "min", "fixed:4"]),
        ("deepsearch", ["tangram", "naive-api"]),
        ("mixed", ["tangram", "static"]),
    ],
)
def test_units_never_exceed_capacity_while_simulating(
    workload: str, policies: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pools so the queue is long: the check runs after every scheduling round. Two
    # API calls at a time: naive-api's refused calls then void trajectories.
    pools: dict[str, Any] = json.loads(json.dumps(WORKLOADS[workload].pools))
    for p in pools["pools"].values():
        if p["kind"] == "cpu":
            p["nodes"] = [{"name": "c", "count": 2, "cores": 24, "numa": 2, "memory_gb": 512}]
        if p["kind"] == "gpu":
            p["nodes"] = [{"name": "g", "count": 2, "gpus": 8, "memory_gb": 80}]
        if p["kind"] == "quota":
            p["concurrency"] = 2
    checked: list[int] = []
    real_check = executor.check_pools  # raises InvariantError on any excess or double grant

    def check_pools(core: Any) -> None:
        checked.append(1)
        real_check(core)

    monkeypatch.setattr(executor, "check_pools", check_pools)
    trajs = generate(workload, 40, 1, 1)
    for policy in policies:
        checked.clear()
        res, runner = simulate(trajs, pools, policy, check=True)
        assert checked, f"{policy}: the capacity check never ran"
        # Every action ran, except those after a failed call: that call voids its
        # trajectory, which then runs nothing more.
        voided = 0
        for i, t in enumerate(runner.trajs):
            runs = [r for r in runner.runs if r.traj == i]
            assert [r.index for r in runs] == list(range(len(runs)))
            assert all(r.ended >= r.submitted for r in runs)
            failed = [r.index for r in runs if r.failed]
            if failed:
                voided += 1
                assert failed == [len(runs) - 1], f"{policy}: {t.id} ran on after a failure"
            else:
                assert len(runs) == len(t.actions), f"{policy}: {t.id} lost actions"
        assert res["voided_trajectories"] == voided
        assert res["actions"] == len(runner.runs)
        if policy == "naive-api":
            assert voided > 0, "these pools must make naive-api void some trajectories"
        else:
            assert voided == 0 and res["quota_violations"] == 0
        for pool in res["pools"].values():
            if pool["utilization"] is not None:
                assert 0.0 <= pool["utilization"] <= 1.0 + 1e-9


def test_k8s_pods_slow_down_when_their_node_is_oversubscribed() -> None:
    # One 2-core node; two pods each run a 4-core test (limit 4): 8 cores wanted on 2,
    # so each runs at a quarter of its speed. Uncontended at 4 cores (perfectly
    # parallel) it takes 8 / 4 = 2 s; contended, 8 s. Pods start after 5 s.
    text = "".join(
        f'{{"kind": "trajectory", "id": "t{i}"}}\n'
        f'{{"kind": "action", "trajectory": "t{i}", "gap": 0, "demands": '
        '{"cpu": {"min": 1, "max": 32}}, "key": "cpu", "duration": 8, '
        '"efficiency": {"amdahl": 1.0}}\n'
        for i in range(2)
    )
    pools = {"pools": {"cpu": {"kind": "cpu", "nodes": [{"cores": 2, "memory_gb": 8}]}}}
    res, runner = simulate(parse_lines(text.splitlines()), pools, "k8s-pod:exec=0,startup_rate=0")
    assert [r.ended - r.submitted for r in runner.runs] == [13.0, 13.0]
    assert res["queue_mean_s"] == 5.0
    assert res["exec_mean_s"] == 8.0


def test_naive_api_counts_refused_calls_and_voids_trajectories() -> None:
    # A provider allowing one call in flight; three trajectories call it at once.
    text = "".join(
        f'{{"kind": "trajectory", "id": "t{i}"}}\n'
        f'{{"kind": "action", "trajectory": "t{i}", "gap": 0, "demands": {{"api": 1}}, '
        '"duration": 700}\n'
        for i in range(3)
    )
    pools = {"pools": {"api": {"kind": "quota", "concurrency": 1}}}
    naive, _ = simulate(parse_lines(text.splitlines()), pools, "naive-api", seed=1)
    assert naive["quota_violations"] > 0
    assert naive["failed_actions"] == naive["voided_trajectories"] >= 1
    broker, _ = simulate(parse_lines(text.splitlines()), pools, "tangram")
    assert broker["quota_violations"] == 0 and broker["failed_actions"] == 0
    assert broker["step_durations_s"] == [2100.0]  # one after another


def test_static_gives_each_service_its_own_gpus() -> None:
    trajs = generate("mopd", 64, 1, 0)
    res, _ = simulate(trajs, WORKLOADS["mopd"].pools, "static", check=True)
    assert res["restores"] == 0  # pre-deployed, never restored
    assert len(res["pools"]) == 9 and all(p["capacity"] == 4 for p in res["pools"].values())


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="baselines"):
        simulate(generate("coding", 2, 1, 0), WORKLOADS["coding"].pools, "fastest")


def test_trajectories_waiting_for_memory_do_not_deadlock_the_pool() -> None:
    # 40 trajectories of 4 GB on 2 x 64 GB: 32 get pinned, the rest wait for memory that
    # only the pinned ones' ending frees. Their later actions must still run (the core
    # once blocked the whole pool behind the first waiter and no memory was ever freed).
    pools = {
        "pools": {
            "cpu": {
                "kind": "cpu",
                "nodes": [{"name": "c", "count": 2, "cores": 24, "memory_gb": 64}],
            }
        }
    }
    trajs = generate("coding", 40, 1, 1)
    res, runner = simulate(trajs, pools, "tangram", check=True)
    assert res["actions"] == sum(len(t.actions) for t in trajs)
    assert len(runner.step_ends) == 1


class _NeverGrants:
    """An executor that accepts actions and never runs them."""

    def bind(self, runner: Runner) -> None:
        self.runner = runner

    def start_trajectory(self, traj: int, now: float) -> None: ...
    def submit(self, run: Any, now: float) -> None: ...
    def settle(self, now: float) -> None: ...
    def end_trajectory(self, traj: int, now: float) -> None: ...

    def result(self, now: float) -> dict[str, Any]:
        return {}

    def stuck_report(self) -> str:
        return "nothing was ever granted"


def test_a_stuck_simulation_is_reported_not_truncated() -> None:
    runner = Runner(generate("coding", 2, 1, 0), _NeverGrants())
    with pytest.raises(SimulationStuck, match=r"can never run.*nothing was ever granted"):
        runner.run()


def test_the_broker_never_exceeds_a_provider_limit_that_naive_clients_hit() -> None:
    # Rate, window and concurrency limits at once; every grant of the core is replayed
    # against an independent provider model, which counts any call over a limit.
    pools = {
        "pools": {
            "search": {
                "kind": "quota",
                "concurrency": 8,
                "window": {"limit": 30, "seconds": 10},
                "rate": {"per_second": 2, "burst": 4},
            },
            "fetch": {"kind": "quota", "concurrency": 4},
            "gpu": WORKLOADS["deepsearch"].pools["pools"]["gpu"],
        }
    }
    trajs = generate("deepsearch", 48, 1, 2)
    broker, _ = simulate(trajs, pools, "tangram", check=True)
    naive, _ = simulate(trajs, pools, "naive-api", check=True)
    assert broker["quota_violations"] == 0
    assert naive["quota_violations"] > 0


def test_provider_refuses_calls_over_its_rate() -> None:
    p = Provider(None, None, (1.0, 2.0))  # one call per second, bursts of two
    assert [p.admit(0.0), p.admit(0.0), p.admit(0.0)] == [True, True, False]
    assert p.admit(0.5) is False
    assert p.admit(1.0) is True


def test_a_pod_that_fits_no_node_stays_pending_until_a_trajectory_ends() -> None:
    # One 1-core node holds two pods by request (0.5 each); the third trajectory's pod
    # is bound when the first trajectory ends (t = 5 s start-up + 2 s), then starts up.
    text = "".join(
        f'{{"kind": "trajectory", "id": "t{i}"}}\n'
        f'{{"kind": "action", "trajectory": "t{i}", "gap": 0, "demands": {{"cpu": 1}}, '
        f'"duration": {2 + i}}}\n'
        for i in range(3)
    )
    pools = {"pools": {"cpu": {"kind": "cpu", "nodes": [{"cores": 1, "memory_gb": 8}]}}}
    res, runner = simulate(parse_lines(text.splitlines()), pools, "k8s-pod:exec=0,startup_rate=0")
    # t0 and t1 share one core from t=5: both at half speed until t0 ends at 9, t1 then
    # alone ends at 10. t2's pod binds at 9, is ready at 14, runs 4 s: ends at 18.
    assert [r.ended for r in runner.runs] == [9.0, 10.0, 18.0]
    assert res["pods_pending"] == 1
