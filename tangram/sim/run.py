"""Run one workload under one policy and summarise it: the benchmark's single entry point.

``POLICIES`` lists what ``--policy`` accepts: the core's scheduling policies (``tangram``
with its options, ``min``, ``fixed:K``) and the modelled baselines (``k8s-pod[:OPT,...]``,
``static[:K]``, ``naive-api[:hang=F]``, ``client-bucket[:OPT,...]``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tangram.config import parse_config
from tangram.core.policy import parse_policy
from tangram.sim.baselines.client_bucket import ClientBucketExecutor, bucket_params
from tangram.sim.baselines.k8s_pod import PodExecutor, pod_params
from tangram.sim.baselines.naive_api import NaiveApiExecutor, NaiveApiParams
from tangram.sim.baselines.static import StaticParams, static_setup
from tangram.sim.engine import Executor, Runner
from tangram.sim.executor import CoreExecutor
from tangram.sim.trace import TrajectorySpec

BASELINES = ("k8s-pod", "static", "naive-api", "client-bucket")

# The second entropy word of the duration-error RNG: a stream apart from the workload's.
DURATION_ERROR_STREAM = 0xD0E


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
    if base in ("k8s-pod", "client-bucket"):
        (pod_params if base == "k8s-pod" else bucket_params)(name)
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
        raise ValueError(
            f"{exc}; baselines: k8s-pod[:OPT,...], static[:K], naive-api[:hang=F], "
            "client-bucket[:OPT,...]"
        ) from None


def build_executor(
    policy: str, config: dict[str, Any], trajs: list[TrajectorySpec], seed: int, check: bool
) -> tuple[Executor, list[TrajectorySpec]]:
    check_policy(policy)
    if policy.partition(":")[0] == "k8s-pod":
        cpu = [(n, p) for n, p in config["pools"].items() if p.get("kind") == "cpu"]
        if len(cpu) != 1:
            raise ValueError("k8s-pod needs exactly one CPU pool in the configuration")
        name, pool = cpu[0]
        return PodExecutor({**pool, "_name": name}, pod_params(policy)), trajs
    if policy.startswith("static"):
        k = int(policy.partition(":")[2] or StaticParams.gpus_per_service)
        cfg, trajs = static_setup(config, trajs, StaticParams(gpus_per_service=k))
        built = parse_config(cfg)
        return CoreExecutor(built.build_pools(), parse_policy("min"), check=check), trajs
    if policy.startswith("client-bucket"):
        return ClientBucketExecutor(config, "tangram", bucket_params(policy), seed, check), trajs
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
    bounds = lower_bounds(trajs, config)  # of the workload as given, before any rewrite
    executor, trajs = build_executor(policy, config, trajs, seed, check)
    runner = Runner(trajs, executor, progress)
    t0 = time.perf_counter()
    runner.run()
    wall = time.perf_counter() - t0
    res = summarise(runner, executor.result(runner.now))
    res.update(bounds)
    res["policy"] = policy
    res["wall_s"] = wall
    return res, runner


def scale_pool(pools: dict[str, Any], pool: str, units: int) -> dict[str, Any]:
    """``pools`` with ``pool`` resized to ``units`` units: whole nodes of the first node
    entry's size, and one smaller node for the remainder (a power of two for GPUs)."""
    out = copy.deepcopy(pools)
    cfg = out["pools"].get(pool)
    if cfg is None or cfg.get("kind") not in ("cpu", "gpu"):
        raise ValueError(f"pool {pool!r} is not a CPU or GPU pool of the configuration")
    first = dict(cfg["nodes"][0])
    field = "cores" if cfg["kind"] == "cpu" else "gpus"
    size = first[field] if isinstance(first[field], int) else len(first[field])
    whole, rest = divmod(units, size)
    first.pop("count", None)
    base = first.pop("name", None) or pool
    nodes = []
    if whole:
        nodes.append({**first, field: size, "name": base, "count": whole})
    if rest:
        if cfg["kind"] == "gpu" and rest & (rest - 1):
            raise ValueError(f"{units} GPUs: the remainder {rest} is not a power of two")
        extra = {**first, field: rest, "name": f"{base}-r"}
        if cfg["kind"] == "cpu":
            extra["numa"] = 1
        nodes.append(extra)
    if not nodes:
        raise ValueError("capacity must be at least one unit")
    cfg["nodes"] = nodes
    return out


def main_pool(pools: dict[str, Any]) -> str:
    """The pool ``--capacity`` resizes by default: the first CPU or GPU pool ("" if none)."""
    return next((n for n, p in pools["pools"].items() if p.get("kind") in ("cpu", "gpu")), "")


def _feasible(config: dict[str, Any] | None) -> Callable[[str, int], bool] | None:
    """Which amounts of a pool one action can get at all: at most the pool's largest
    node (an allocation never spans nodes), and on a GPU pool running services one of
    the parallelisms its services are configured with."""
    if config is None:
        return None
    caps: dict[str, int] = {}
    tps: dict[str, set[int]] = {}
    for name, pool in config.get("pools", {}).items():
        field = {"cpu": "cores", "gpu": "gpus"}.get(pool.get("kind", ""))
        if field is None:
            continue
        sizes = [n[field] if isinstance(n[field], int) else len(n[field]) for n in pool["nodes"]]
        caps[name] = max(sizes, default=0)
        par = {
            int(k) for sc in pool.get("services", {}).values() for k in sc.get("parallelism", ())
        }
        if par:
            tps[name] = par

    def feasible(pool: str, amount: int) -> bool:
        return amount <= caps.get(pool, amount) and (pool not in tps or amount in tps[pool])

    return feasible


def lower_bounds(
    trajs: list[TrajectorySpec], config: dict[str, Any] | None = None
) -> dict[str, float]:
    """What no policy can beat, from the trajectories alone: every action at its fastest
    feasible amount on its key pool, with no queueing and no restore.

    ``act_lower_bound_s``: the mean of those fastest durations over all actions.
    ``step_lower_bound_s``: per step, the longest trajectory when each runs its
    generation gaps and its actions at their fastest back to back; the mean over steps.
    (A policy that voids trajectories runs fewer actions and ends them early, so its
    figures may fall below these.)
    """
    feasible = _feasible(config)
    total, count = 0.0, 0
    longest: dict[int, float] = {}
    for t in trajs:
        length = 0.0
        for a in t.actions:
            fast = a.fastest(feasible)
            total += fast
            count += 1
            length += a.gap + fast
        longest[t.step] = max(longest.get(t.step, 0.0), length)
    return {
        "act_lower_bound_s": total / count if count else 0.0,
        "step_lower_bound_s": float(np.mean(list(longest.values()))) if longest else 0.0,
    }


def declare_durations(
    trajs: list[TrajectorySpec], sigma: float = 0.0, hide: bool = False, seed: int = 0
) -> list[TrajectorySpec]:
    """The trajectories with what their actions *declare* to the scheduler changed; their
    true durations (what the simulation executes) are untouched.

    ``sigma > 0``: each action declares its true duration times exp(N(0, sigma)), drawn
    in trajectory and action order from an RNG of its own (seeded by ``seed`` and a
    constant), so the workload itself is the one the seed generates. ``hide``: actions
    declare no duration at all (the efficiency curve stays known). Neither: ``trajs``.
    """
    if sigma < 0:
        raise ValueError(f"--duration-error must be >= 0, got {sigma}")
    if hide:
        return [
            dataclasses.replace(t, actions=[dataclasses.replace(a, hidden=True) for a in t.actions])
            for t in trajs
        ]
    if sigma == 0:
        return trajs
    rng = np.random.default_rng([seed, DURATION_ERROR_STREAM])
    factors = np.exp(rng.normal(0.0, sigma, sum(len(t.actions) for t in trajs)))
    out = []
    i = 0
    for t in trajs:
        acts = []
        for a in t.actions:
            acts.append(dataclasses.replace(a, declared=a.duration * float(factors[i])))
            i += 1
        out.append(dataclasses.replace(t, actions=acts))
    return out


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else 0.0


def summarise(runner: Runner, extra: dict[str, Any]) -> dict[str, Any]:
    runs = runner.runs
    done = [r for r in runs if r.ended >= 0]
    act = np.array([r.ended - r.submitted for r in done])
    queue = np.array([max(0.0, r.started - r.submitted) for r in done])
    exe = np.array([r.exec_s for r in done])
    setup = np.array([r.setup_s for r in done])
    sched = np.array([r.sched_s for r in done])
    by_label: dict[str, dict[str, float]] = {}
    for label in sorted({r.spec.label for r in done}):
        sel = np.array([r.spec.label == label for r in done])
        by_label[label or "-"] = {
            "count": int(sel.sum()),
            "act_mean_s": _mean(act[sel]),
            "queue_mean_s": _mean(queue[sel]),
            "exec_mean_s": _mean(exe[sel]),
        }
    starts = runner.step_starts
    steps = [e - s for s, e in zip(starts, runner.step_ends, strict=False)]
    valid = len(runner.trajs) - runner.voided
    step_total = float(sum(steps))
    return {
        "actions": len(done),
        "trajectories": len(runner.trajs),
        "act_mean_s": _mean(act),
        "act_p50_s": float(np.percentile(act, 50)) if len(act) else 0.0,
        "act_p99_s": float(np.percentile(act, 99)) if len(act) else 0.0,
        "queue_mean_s": _mean(queue),
        "exec_mean_s": _mean(exe),
        "setup_mean_s": _mean(setup),
        "sched_overhead_mean_s": _mean(sched),
        "step_durations_s": steps,
        "step_mean_s": float(np.mean(steps)) if steps else 0.0,
        "makespan_s": runner.step_ends[-1] if runner.step_ends else 0.0,
        "failed_actions": sum(1 for r in done if r.failed),
        "voided_trajectories": runner.voided,
        # RL samples per hour of step time: a voided trajectory is a lost sample.
        "valid_trajectories_per_hour": valid * 3600.0 / step_total if step_total > 0 else 0.0,
        "by_label": by_label,
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
