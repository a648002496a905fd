"""``tangram bench`` end to end on tiny workloads: results.json and PNGs are written,
a saved trace replays to the same figures, errors name what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tangram.cli import app

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


@pytest.mark.parametrize("cmd", ["sim", "replay", "sweep", "workloads"])
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
