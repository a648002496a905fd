"""Run one workload under one policy and summarise it: the benchmark's single entry point.

``POLICIES`` lists what ``--policy`` accepts: the core's scheduling policies (``tangram``
with its options, ``min``, ``fixed:K``) and the modelled baselines (``k8s-pod``,
``static[:K]``, ``naive-api[:hang=F]``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tangram.config import parse_config
from tangram.core.policy import parse_policy
from tangram.sim.baselines.k8s_pod import PodExecutor, PodParams
from tangram.sim.baselines.naive_api import NaiveApiExecutor, NaiveApiParams
from tangram.sim.baselines.static import StaticParams, static_setup
from tangram.sim.engine import Executor, Runner
from tangram.sim.executor import CoreExecutor
from tangram.sim.trace import TrajectorySpec

BASELINES = ("k8s-pod", "static", "naive-api")


def naive_params(name: str) -> NaiveApiParams:
    """``naive-api`` or ``naive-api:hang=F``: F, the share of refused calls that hang until
    the timeout (the rest get a quick error), in [0, 1]."""
    arg = name.partition(":")[2]
    if not arg:
        return NaiveApiParams()
    key, _, val = arg.partition("=")
    try:
        share = float(val)
    except ValueError:
        share = -1.0
    if key != "hang" or not 0.0 <= share <= 1.0:
        raise ValueError(f"policy {name!r}: write naive-api or naive-api:hang=F with F in [0, 1]")
    return NaiveApiParams(hang_share=share)


def check_policy(name: str) -> None:
    """Raise ValueError for a policy name neither the core nor the baselines know."""
    base = name.partition(":")[0]
    if base == "naive-api":
        naive_params(name)
        return
    if base == "static":
        arg = name.partition(":")[2]
        if arg and not (arg.isdigit() and int(arg) in (1, 2, 4, 8)):
            raise ValueError(f"policy {name!r}: write static or static:K with K in 1, 2, 4, 8")
        return
    if name in BASELINES:
        return
    try:
        parse_policy(name)
    except ValueError as exc:
        raise ValueError(f"{exc}; baselines: k8s-pod, static[:K], naive-api[:hang=F]") from None


def build_executor(
    policy: str, config: dict[str, Any], trajs: list[TrajectorySpec], seed: int, check: bool
) -> tuple[Executor, list[TrajectorySpec]]:
    check_policy(policy)
    if policy == "k8s-pod":
        cpu = [(n, p) for n, p in config["pools"].items() if p.get("kind") == "cpu"]
        if len(cpu) != 1:
            raise ValueError("k8s-pod needs exactly one CPU pool in the configuration")
        name, pool = cpu[0]
        return PodExecutor({**pool, "_name": name}, PodParams()), trajs
    if policy.startswith("static"):
        k = int(policy.partition(":")[2] or StaticParams.gpus_per_service)
        cfg, trajs = static_setup(config, trajs, StaticParams(gpus_per_service=k))
        built = parse_config(cfg)
        return CoreExecutor(built.build_pools(), parse_policy("min"), check=check), trajs
    if policy.startswith("naive-api"):
        return NaiveApiExecutor(config, "tangram", naive_params(policy), seed, check), trajs
    built = parse_config(config)
    return CoreExecutor(built.build_pools(), parse_policy(policy), check=check), trajs


def simulate(
    trajs: list[TrajectorySpec],
    config: dict[str, Any],
    policy: str,
    *,
    seed: int = 0,
    check: bool = False,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], Runner]:
    """Run ``trajs`` on ``config``'s pools under ``policy``; return (results, runner)."""
    executor, trajs = build_executor(policy, config, trajs, seed, check)
    runner = Runner(trajs, executor, progress)
    t0 = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - t0
    res = summarise(runner, executor.result(runner.now))
    res["policy"] = policy
    res["wall_s"] = wall
    return res, runner


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.0


def summarise(runner: Runner, extra: dict[str, Any]) -> dict[str, Any]:
    runs = runner.runs
    done = [r for r in runs if r.ended >= 0]
    act = np.array([r.ended - r.submitted for r in done])
    queue = np.array([max(0.0, r.started - r.submitted) for r in done])
    exe = np.array([r.exec_s for r in done])
    over = np.array([r.overhead_s for r in done])
    sched = np.array([r.sched_s for r in done])
    by_kind: dict[str, dict[str, float]] = {}
    for kind in sorted({r.spec.kind for r in done}):
        sel = np.array([r.spec.kind == kind for r in done])
        by_kind[kind or "-"] = {
            "count": int(sel.sum()),
            "act_mean_s": _mean(act[sel]),
            "queue_mean_s": _mean(queue[sel]),
            "exec_mean_s": _mean(exe[sel]),
        }
    starts = runner.step_starts
    steps = [e - s for s, e in zip(starts, runner.step_ends, strict=False)]
    return {
        "actions": len(done),
        "trajectories": len(runner.trajs),
        "act_mean_s": _mean(act),
        "act_p50_s": float(np.percentile(act, 50)) if len(act) else 0.0,
        "act_p99_s": float(np.percentile(act, 99)) if len(act) else 0.0,
        "queue_mean_s": _mean(queue),
        "exec_mean_s": _mean(exe),
        "overhead_mean_s": _mean(over),
        "sched_overhead_mean_s": _mean(sched),
        "step_durations_s": steps,
        "step_mean_s": float(np.mean(steps)) if steps else 0.0,
        "makespan_s": runner.step_ends[-1] if runner.step_ends else 0.0,
        "failed_actions": sum(1 for r in done if r.failed),
        "voided_trajectories": runner.voided,
        "by_kind": by_kind,
        "restores": extra.pop("restores", 0),
        "quota_violations": extra.pop("quota_violations", extra.get("failed_calls", 0)),
        **extra,
    }


def act_series(runner: Runner) -> tuple[np.ndarray, np.ndarray]:
    """(submit times, ACTs) of the finished actions, in submission order."""
    done = sorted((r for r in runner.runs if r.ended >= 0), key=lambda r: r.submitted)
    return (
        np.array([r.submitted for r in done]),
        np.array([r.ended - r.submitted for r in done]),
    )
