"""``tangram bench`` end to end on tiny workloads: results.json and PNGs are written,
a saved trace replays to the same figures, errors name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tangram.cli import app
from tangram.sim import report
from tangram.sim.run import act_series, simulate
from tangram.sim.workloads import WORKLOADS, generate

runner = CliRunner()

VOLATILE = ("wall_s", "sched_wall_s", "sched_overhead_mean_s")


def _policies(path: Path) -> dict[str, dict[str, object]]:
    data = json.loads((path / "results.json").read_text())
    out = data["policies"]
    for r in out.values():
        for k in VOLATILE:
            r.pop(k, None)
    return out  # type: ignore[no-any-return]


def test_sim_writes_results_and_plots_and_replays_identically(tmp_path: Path) -> None:
    trace = tmp_path / "w.jsonl"
    res = runner.invoke(
        app,
        [
            "bench", "sim", "-w", "coding", "-b", "12", "-p", "tangram", "-p", "min",
            "-p", "k8s-pod", "--out", str(tmp_path / "a"), "--save-trace", str(trace), "--check",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for f in ("results.json", "act_over_time.png", "act_split.png"):
        assert (tmp_path / "a" / f).stat().st_size > 0
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    r = data["policies"]["tangram"]
    for key in (
        "act_mean_s", "act_p50_s", "act_p99_s", "queue_mean_s", "exec_mean_s",
        "setup_mean_s", "step_durations_s", "makespan_s", "restores",
        "quota_violations", "failed_actions",
    ):  # fmt: skip
        assert key in r
    assert set(r["pools"]["cpu"]) >= {"busy_unit_s", "idle_unit_s", "utilization"}
    res = runner.invoke(
        app,
        [
            "bench", "replay", str(trace), "-w", "coding", "-p", "tangram", "-p", "min",
            "-p", "k8s-pod", "--out", str(tmp_path / "b"),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert _policies(tmp_path / "a") == _policies(tmp_path / "b")


def test_sweep_writes_one_point_per_value(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "bench", "sweep", "-w", "mopd", "-p", "tangram", "-p", "static",
            "--vary", "capacity", "--values", "8,12", "-b", "16", "--out", str(tmp_path),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert [p["capacity"] for p in data["points"]] == [8, 12]
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_replay_reports_the_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "trajectory", "id": "t0"}\n{"kind": "action"}\n')
    res = runner.invoke(app, ["bench", "replay", str(bad), "-w", "coding", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "line 2" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sim", "-w", "nope"], "unknown workload"),
        (["sim", "-p", "fastest"], "unknown policy"),
        (["sim", "-p", "naive-api:hang=2"], "F in [0, 1]"),
        (["sweep", "--vary", "speed"], "batch or capacity"),
        (["sweep", "--vary", "capacity", "-w", "mopd", "--values", "12,6"], "power of two"),
    ],
)
def test_bad_arguments_say_what_is_wrong(args: list[str], message: str, tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", *args, "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert message in res.output


@pytest.mark.parametrize("cmd", ["sim", "replay", "sweep", "matrix", "workloads"])
def test_every_command_has_help(cmd: str) -> None:
    res = runner.invoke(app, ["bench", cmd, "--help"])
    assert res.exit_code == 0
    assert "Usage" in res.output


def test_an_action_the_pools_cannot_serve_is_named(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"kind": "trajectory", "id": "t0"}\n'
        '{"kind": "action", "trajectory": "t0", "demands": {"tpu": 1}, "duration": 1}\n'
    )
    res = runner.invoke(
        app, ["bench", "replay", str(trace), "-w", "coding", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2
    assert "trajectory t0, action 1: unknown pool 'tpu'" in res.output


def _json_stdout(args: list[str]) -> dict[str, Any]:
    """Run ``tangram bench ARGS --json``: stdout must be exactly one JSON document."""
    res = runner.invoke(app, ["bench", *args, "--json"])
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_json_prints_only_the_results_on_stdout(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    doc = _json_stdout(["sim", "-w", "coding", "-b", "8", "-p", "tangram", "-p", "min",
                        "--out", str(out), "--save-trace", str(tmp_path / "w.jsonl")])  # fmt: skip
    assert doc == json.loads((out / "results.json").read_text())
    assert set(doc["policies"]) == {"tangram", "min"}
    doc = _json_stdout(["replay", str(tmp_path / "w.jsonl"), "-w", "coding",
                        "--out", str(tmp_path / "replay")])  # fmt: skip
    assert doc == json.loads((tmp_path / "replay" / "results.json").read_text())
    doc = _json_stdout(["sweep", "-w", "coding", "--values", "4,8", "-p", "tangram",
                        "--out", str(tmp_path / "sweep")])  # fmt: skip
    assert [p["batch"] for p in doc["points"]] == [4, 8]
    assert doc == json.loads((tmp_path / "sweep" / "results.json").read_text())
    doc = _json_stdout(["workloads"])
    assert doc["coding"]["parameters"]["batch"]["value"] == 1280
    assert doc["coding"]["parameters"]["batch"]["source"] == "paper"
    assert doc["coding"]["parameters"]["turns_min"]["source"] == "assumed"
    assert doc["mixed"]["pools"] and "baseline k8s-pod" in doc


def test_workloads_prints_a_table_of_parameters_and_sources() -> None:
    res = runner.invoke(app, ["bench", "workloads"])
    assert res.exit_code == 0, res.output
    assert "{" not in res.stdout  # no Python dicts
    for word in ("workload", "parameter", "value", "source", "turns_min", "assumed", "paper"):
        assert word in res.stdout, word


def test_sweep_ends_with_a_summary_of_every_point(tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["bench", "sweep", "-w", "coding", "--values", "4,8", "-p", "tangram", "-p", "min",
         "--ref", "min", "--out", str(tmp_path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    summary = res.stdout[res.stdout.index("coding, sweep over batch") :]
    assert "ACT / min ACT" in summary and "step / min step" in summary
    assert summary.count("1.00x") >= 4  # min against itself at both points, ACT and step


def test_every_plot_has_a_title_axis_labels_and_a_legend(tmp_path: Path) -> None:
    trajs = generate("coding", 6, 1, 0)
    pools = WORKLOADS["coding"].pools
    results, series = {}, {}
    for pol in ("tangram", "min"):
        res, run = simulate(trajs, pools, pol, seed=0)
        results[pol], series[pol] = res, act_series(run)
    figures = [
        report.plot_act_over_time(series, tmp_path / "a.png", title="coding, batch 6"),
        report.plot_act_split(results, tmp_path / "b.png", title="coding, batch 6"),
        report.plot_sweep([4.0, 8.0], {"tangram": [1.0, 2.0]}, "batch size", tmp_path / "c.png"),
    ]
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    for fig in figures:
        (ax,) = fig.axes
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), fig
        assert ax.get_legend() is not None and ax.get_legend().get_texts()
    assert "(s)" in figures[0].axes[0].get_xlabel()  # units
    assert all((tmp_path / f).stat().st_size > 0 for f in ("a.png", "b.png", "c.png"))
