"""``tangram bench matrix`` and what it rests on: the grid and its summary line, the lower
bounds, declared durations (``--duration-error``, ``--hide-durations``), the coding
variants and valid trajectories per hour."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tangram.cli import app
from tangram.sim import matrix
from tangram.sim.engine import ActionRun, Runner
from tangram.sim.executor import CoreExecutor
from tangram.sim.run import build_executor, declare_durations, lower_bounds, simulate
from tangram.sim.trace import TrajectorySpec, dump_lines, parse_lines
from tangram.sim.workloads import WORKLOADS, CodingLongParams, CodingShortParams, generate

runner = CliRunner()

GRID = ["-w", "coding", "-b", "16", "--capacity", "64", "--seeds", "0,1"]
POLICIES = ["-p", "min", "-p", "fixed:2", "-p", "fixed:4"]
VOLATILE = ("wall_s", "sched_wall_s", "sched_overhead_mean_s")


def _matrix(tmp: Path, *args: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    res = runner.invoke(app, ["bench", "matrix", *args, "--out", str(tmp)])
    assert res.exit_code == 0, res.output
    last = res.output.strip().splitlines()[-1]
    return json.loads(last), json.loads((tmp / "matrix.json").read_text()), res.output


def _figures(data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for case in data["cases"]:
        pols = {
            p: {k: v for k, v in r.items() if k not in VOLATILE}
            for p, r in case["policies"].items()
        }
        out.append({**case, "policies": pols})
    return out


def test_matrix_counts_agree_with_its_cases(tmp_path: Path) -> None:
    line, data, output = _matrix(tmp_path / "a", *GRID, *POLICIES, "--jobs", "2")
    cases = data["cases"]
    assert line["cases"] == len(cases) == 2
    assert [c["case"] for c in cases] == ["coding b16 c64 s0", "coding b16 c64 s1"]
    assert "tangram *" in output  # the default's column is marked
    assert set(line) == {
        "cases",
        "default",
        "no_worse_act",
        "no_worse_step",
        "no_worse_both",
        "strictly_better_act",
        "geomean_act_vs_best_fixed",
        "geomean_step_vs_best_fixed",
        "tolerance",
    }  # fmt: skip  (no paper: nothing against it)
    assert line["default"] == "tangram" and line["tolerance"] == 0.001
    # Recomputed here from matrix.json: min is not a competitor, fixed:2 and fixed:4 are.
    want = {"no_worse_act": 0, "no_worse_step": 0, "no_worse_both": 0, "strictly_better_act": 0}
    ratios: dict[str, list[float]] = {"act": [], "step": []}
    for c in cases:
        pols = c["policies"]
        assert set(pols) == {"tangram", "min", "fixed:2", "fixed:4"}
        ok = {}
        for metric, key in (("act", "act_mean_s"), ("step", "step_mean_s")):
            best = min(pols["fixed:2"][key], pols["fixed:4"][key])
            mine = pols["tangram"][key]
            ok[metric] = mine <= best * 1.001
            ratios[metric].append(mine / best)
            bf = c["best_fixed"][metric]
            assert bf["value"] == best and pols[bf["policy"]][key] == best
            # Lower bounds: no policy beats them.
            bound = c[f"{metric}_lower_bound_s"]
            assert all(r[key] >= bound - 1e-9 for r in pols.values())
        want["no_worse_act"] += ok["act"]
        want["no_worse_step"] += ok["step"]
        want["no_worse_both"] += ok["act"] and ok["step"]
        act = pols["tangram"]["act_mean_s"]
        want["strictly_better_act"] += act < min(
            pols["fixed:2"]["act_mean_s"], pols["fixed:4"]["act_mean_s"]
        )
    assert {k: line[k] for k in want} == want
    for metric in ("act", "step"):
        geo = math.exp(sum(math.log(r) for r in ratios[metric]) / len(ratios[metric]))
        assert line[f"geomean_{metric}_vs_best_fixed"] == pytest.approx(geo, rel=1e-5)
    assert data["summary"] == line
    # One worker or two: the same figures.
    _, serial, _ = _matrix(tmp_path / "b", *GRID, *POLICIES, "--jobs", "1")
    assert _figures(serial) == _figures(data)


def _entry(figs: dict[str, tuple[float, float] | None]) -> dict[str, Any]:
    pols = {
        p: ({"error": "stuck"} if f is None else {"act_mean_s": f[0], "step_mean_s": f[1]})
        for p, f in figs.items()
    }
    return {
        "policies": pols,
        "best_fixed": {
            m: matrix._best_fixed(pols, k)
            for m, k in (("act", "act_mean_s"), ("step", "step_mean_s"))
        },
    }


def test_summary_compares_with_paper_and_the_best_fixed_k_within_the_tolerance() -> None:
    entries = [
        # no worse on ACT only within the tolerance, worse on step than fixed:4
        _entry({"tangram": (1.0005, 10.0), "paper": (2.0, 20.0), "fixed:2": (1.0, 9.0),
                "fixed:4": (3.0, 8.0)}),
        # strictly better on both
        _entry({"tangram": (1.0, 5.0), "paper": (2.0, 10.0), "fixed:2": (4.0, 10.0),
                "fixed:4": None}),
        # the default failed: worse on both
        _entry({"tangram": None, "paper": (2.0, 10.0), "fixed:2": (4.0, 10.0)}),
    ]  # fmt: skip
    s = matrix.summarise(entries, "tangram", 0.001)
    assert s["cases"] == 3
    assert (s["no_worse_act"], s["no_worse_step"], s["no_worse_both"]) == (2, 1, 1)
    assert s["strictly_better_act"] == 1
    assert s["geomean_act_vs_paper"] == pytest.approx(math.sqrt(1.0005 / 2 * 1 / 2), rel=1e-5)
    assert s["geomean_step_vs_paper"] == pytest.approx(0.5)
    assert s["geomean_act_vs_best_fixed"] == pytest.approx(math.sqrt(1.0005 / 4), rel=1e-5)
    assert s["geomean_step_vs_best_fixed"] == pytest.approx(math.sqrt(10 / 8 * 5 / 10))
    assert entries[0]["best_fixed"]["act"] == {"policy": "fixed:2", "value": 1.0}
    assert entries[0]["best_fixed"]["step"] == {"policy": "fixed:4", "value": 8.0}
    # Without paper, only the fixed ones count and the geomeans against paper are omitted.
    alone = matrix.summarise([_entry({"tangram": (1.0, 1.0), "fixed:2": (1.0, 2.0)})], "tangram")
    assert "geomean_act_vs_paper" not in alone and alone["no_worse_both"] == 1
    assert alone["strictly_better_act"] == 0


def test_rows_a_to_f_are_eleven_distinct_cases_per_seed() -> None:
    cases = matrix.row_cases(matrix.parse_rows("A-F"), [0, 1, 2])
    assert len(cases) == 33
    points = {(c.batch, c.capacity) for c in cases}
    assert len(points) == 11
    assert points == {
        (1280, None), (256, 1280), (1280, 1280), (1280, 768),
        (128, 1280), (512, 1280), (1024, 1280), (1536, 1280),
        (1280, 1024), (1280, 1536), (1280, 2048),
    }  # fmt: skip
    assert matrix.parse_rows("A,c,E") == ["A", "C", "E"] == matrix.parse_rows("ACE")
    assert len(matrix.row_cases(["E"], [0])) == 6
    with pytest.raises(ValueError, match="A to F"):
        matrix.parse_rows("G")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "A-F", "-w", "mopd"], "--rows fixes workload"),
        (["--rows", "Z"], "A to F"),
        (["--preset", "nope"], "unknown --preset"),
        (["--batch", "0"], "whole numbers >= 1"),
        (["-p", "fastest"], "unknown policy"),
        (["--duration-error", "0.3", "--hide-durations"], "leave out"),
        (["-w", "mopd", "--capacity", "8,6"], "power of two"),
    ],
)  # fmt: skip
def test_matrix_refuses_bad_arguments(args: list[str], message: str, tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "matrix", *args, "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert message in res.output


def test_matrix_has_help() -> None:
    res = runner.invoke(app, ["bench", "matrix", "--help"])
    assert res.exit_code == 0 and "--fixed-sweep" in res.output


# ----------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("workload", "policies"),
    [
        ("coding", ["tangram", "min", "fixed:4", "k8s-pod"]),
        ("deepsearch", ["tangram", "min"]),
        ("mopd", ["tangram", "static"]),
    ],
)
def test_lower_bounds_hold_for_every_policy(workload: str, policies: list[str]) -> None:
    trajs = generate(workload, 24, 1, 5)
    bounds = lower_bounds(trajs, WORKLOADS[workload].pools)
    for policy in policies:
        res, _ = simulate(trajs, WORKLOADS[workload].pools, policy)
        assert res["act_lower_bound_s"] == bounds["act_lower_bound_s"]
        assert res["act_mean_s"] >= bounds["act_lower_bound_s"] - 1e-9, policy
        assert res["step_mean_s"] >= bounds["step_lower_bound_s"] - 1e-9, policy


def test_sim_prints_the_lower_bounds_and_writes_them(tmp_path: Path) -> None:
    res = runner.invoke(
        app, ["bench", "sim", "-w", "coding", "-b", "8", "-p", "min", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert "lower bound" in res.output
    r = json.loads((tmp_path / "results.json").read_text())["policies"]["min"]
    assert 0 < r["act_lower_bound_s"] <= r["act_mean_s"]
    assert 0 < r["step_lower_bound_s"] <= r["step_mean_s"]


# ----------------------------------------------------------------------------- declared durations


def _declared(trajs: list[TrajectorySpec]) -> list[float | None]:
    """The duration each action's submitted ``Action`` carries."""
    ex, trajs = build_executor("tangram", WORKLOADS["coding"].pools, trajs, 0, False)
    assert isinstance(ex, CoreExecutor)
    ex.bind(Runner(trajs, ex))
    out = []
    for i, t in enumerate(trajs):
        for j, a in enumerate(t.actions):
            out.append(ex.make_action(ActionRun(i, j, a, 0)).duration)
    return out


def test_duration_error_changes_what_is_declared_not_the_workload() -> None:
    plain = generate("coding", 6, 1, 4)
    noisy = declare_durations(generate("coding", 6, 1, 4), 0.5, seed=4)
    # The workload, true durations included, is the one the seed generates.
    assert list(dump_lines(noisy)) == list(dump_lines(plain))
    true = [a.duration for t in plain for a in t.actions]
    assert [a.duration for t in noisy for a in t.actions] == true
    said = _declared(noisy)
    assert _declared(plain) == true
    assert all(d is not None and d > 0 for d in said)
    assert sum(d != t for d, t in zip(said, true, strict=True)) == len(true)
    # Log-normal factors: declared / true has log-mean near 0 and log-sd near 0.5.
    logs = [math.log(d / t) for d, t in zip(said, true, strict=True) if d and t]  # type: ignore[operator]
    assert abs(sum(logs) / len(logs)) < 0.2
    # Seeded: the same seed gives the same declarations, another seed others.
    again = declare_durations(generate("coding", 6, 1, 4), 0.5, seed=4)
    other = declare_durations(generate("coding", 6, 1, 4), 0.5, seed=5)
    assert _declared(again) == said != _declared(other)
    assert declare_durations(plain, 0.0) is plain


ONE = """\
{"kind": "trajectory", "id": "t0"}
{"kind": "action", "trajectory": "t0", "gap": 1, "demands": {"cpu": {"min": 1, "max": 4}}, \
"key": "cpu", "duration": 8, "efficiency": {"amdahl": 1.0}}
{"kind": "action", "trajectory": "t0", "gap": 1, "demands": {"cpu": 1}, "duration": 3}
"""
FOUR = {"pools": {"cpu": {"kind": "cpu", "nodes": [{"cores": 4, "memory_gb": 8}]}}}


@pytest.mark.parametrize(("sigma", "hide"), [(0.0, False), (1.0, False), (0.0, True)])
def test_execution_follows_the_true_duration_whatever_is_declared(sigma: float, hide: bool) -> None:
    # The elastic action on 4 cores runs 8 / 4 = 2 s, the tool 3 s, whatever they said.
    trajs = declare_durations(parse_lines(ONE.splitlines()), sigma, hide, seed=1)
    for policy, acts in (("fixed:4", [2.0, 3.0]), ("min", [8.0, 3.0])):
        _, run = simulate(trajs, FOUR, policy)
        assert [r.exec_s for r in run.runs] == acts
        assert [r.ended - r.submitted for r in run.runs] == acts


def test_hide_durations_declares_none_and_still_runs(tmp_path: Path) -> None:
    hidden = declare_durations(generate("coding", 8, 1, 0), hide=True)
    assert list(dump_lines(hidden)) == list(dump_lines(generate("coding", 8, 1, 0)))
    assert set(_declared(hidden)) == {None}
    res = runner.invoke(
        app,
        ["bench", "sim", "-w", "coding", "-b", "8", "-p", "tangram", "-p", "fixed:4",
         "--hide-durations", "--out", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["hide_durations"] is True and data["duration_error"] == 0.0
    assert data["policies"]["tangram"]["actions"] == sum(len(t.actions) for t in hidden)


# ----------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("name", ["coding-short", "coding-long"])
def test_coding_variants_are_registered_and_deterministic(name: str) -> None:
    assert name in WORKLOADS
    a = list(dump_lines(generate(name, 12, 2, 3)))
    assert a == list(dump_lines(generate(name, 12, 2, 3)))
    assert a != list(dump_lines(generate(name, 12, 2, 4)))


def test_coding_short_runs_many_short_poorly_parallel_suites() -> None:
    p = CodingShortParams()
    trajs = generate("coding-short", 40, 1, 0)
    for t in trajs:
        tools = sum(a.label == "tool" for a in t.actions)
        tests = [a for a in t.actions if a.label == "test"]
        assert len(tests) == 1 + (tools - 1) // p.test_every
        assert t.actions[-1].label == "test"
        for a in tests:
            assert p.amdahl_lo <= a.efficiency.parallel_fraction <= p.amdahl_hi  # type: ignore[union-attr]
    durs = sorted(a.duration for t in trajs for a in t.actions if a.label == "test")
    assert 5 < durs[len(durs) // 2] < 20


def test_coding_long_runs_rare_long_suites_on_some_trajectories() -> None:
    p = CodingLongParams()
    trajs = generate("coding-long", 200, 1, 0)
    with_suite = [t for t in trajs if t.actions[-1].label == "test"]
    assert 0.1 < len(with_suite) / len(trajs) < 0.3
    assert all(sum(a.label == "test" for a in t.actions) <= 1 for t in trajs)
    durs = sorted(t.actions[-1].duration for t in with_suite)
    assert 100 < durs[len(durs) // 2] < 400
    assert all(
        p.amdahl_lo <= t.actions[-1].efficiency.parallel_fraction <= p.amdahl_hi  # type: ignore[union-attr]
        for t in with_suite
    )


# ----------------------------------------------------------------------------- valid samples


def test_valid_trajectories_per_hour_leaves_out_the_voided() -> None:
    text = "".join(
        f'{{"kind": "trajectory", "id": "t{i}"}}\n'
        f'{{"kind": "action", "trajectory": "t{i}", "gap": 0, "demands": {{"api": 1}}, '
        '"duration": 700}\n'
        for i in range(3)
    )
    pools = {"pools": {"api": {"kind": "quota", "concurrency": 1}}}
    for policy in ("naive-api", "tangram"):
        res, _ = simulate(parse_lines(text.splitlines()), pools, policy, seed=1)
        valid = 3 - res["voided_trajectories"]
        assert res["valid_trajectories_per_hour"] == pytest.approx(
            valid * 3600 / sum(res["step_durations_s"])
        )
    assert res["valid_trajectories_per_hour"] == pytest.approx(3 * 3600 / 2100)


def test_matrix_json_prints_what_matrix_json_holds_and_nothing_else(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["bench", "matrix", "-w", "coding", "-b", "8", "--capacity", "64", "-p", "fixed:2",
         "--jobs", "1", "--out", str(tmp_path), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc == json.loads((tmp_path / "matrix.json").read_text())
    assert doc["summary"]["cases"] == len(doc["cases"]) == 1
    assert "tangram *" in res.stderr  # the table went to stderr
