"""Time one scheduling round with 1,000 queued elastic actions, and with 10,000 on the
paper's cluster size.

Three pools: one node of 256 cores (2 NUMA groups), 5 nodes of 8 GPUs with a service,
and 16 nodes of 256 cores with 10,000 queued actions shaped like the coding workload
(nine of ten a one-core tool call, one in ten a 1-32 core test). Two situations each:
- cold: every unit free, 1,000 actions queued (the largest round there is: every unit
  is handed out at once);
- steady: the pool is full and a few leases end before the round (the common round in
  a running RL step: a completion frees units for the head of the queue).
The ``min`` policy (FCFS at minimum, no DP) runs the same rounds as the reference, and
``paper`` (the paper's scheduler) beside the default.
As with ``timeit``, the garbage collector is paused while a round is timed (building a
thousand actions leaves collection work that would land on a random round).
The last line of output is JSON with every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable

from tangram.config import parse_config
from tangram.core.policy import Policy, parse_policy
from tangram.core.state import Core
from tangram.spec import Action, Amdahl, Demand

CPU = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": 256, "numa": 2, "memory_gb": 2048}]}
}
GPU = {
    "gpu": {
        "kind": "gpu",
        "nodes": [{"count": 5, "gpus": 8, "memory_gb": 80}],
        "services": {
            "judge": {"memory_gb": 60, "restore_seconds": 3.0, "parallelism": [1, 2, 4, 8]}
        },
    }
}


def cpu_action(rng: random.Random, i: int) -> Action:
    return Action(
        trajectory=f"t{i}",
        demands={"cpu": Demand(1, 32)},
        key="cpu",
        duration=rng.uniform(1.0, 20.0),
        efficiency=Amdahl(rng.uniform(0.8, 0.99)),
    )


def gpu_action(rng: random.Random, i: int) -> Action:
    return Action(
        trajectory=f"t{i}",
        demands={"gpu": Demand.of_choices([1, 2, 4, 8])},
        key="gpu",
        duration=rng.uniform(0.5, 5.0),
        efficiency=Amdahl(rng.uniform(0.7, 0.95)),
        service="judge",
    )


CLUSTER = {
    "cpu": {
        "kind": "cpu",
        "nodes": [{"name": "n", "count": 16, "cores": 256, "numa": 2, "memory_gb": 2400}],
    }
}


def coding_action(rng: random.Random, i: int) -> Action:
    if rng.random() < 0.9:
        return Action(
            trajectory=f"t{i}", demands={"cpu": Demand(1, 1)}, duration=rng.uniform(0.01, 3.0)
        )
    return cpu_action(rng, i)


def build(
    config: dict,
    policy: Policy,
    make: Callable[[random.Random, int], Action],
    queued: int,
    seed: int,
) -> Core:
    cfg = parse_config({"pools": config})
    core = Core(cfg.build_pools(), policy, lease_ttl=1e9)
    rng = random.Random(seed)
    for i in range(queued):
        core.submit(make(rng, i), 0.0)
    return core


def timed(fn: Callable[[float], object], now: float) -> float:
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn(now)
        return time.perf_counter() - t0
    finally:
        gc.enable()


def time_cold(config: dict, policy: Policy, make: Callable, queued: int, reps: int) -> list[float]:
    out = []
    for r in range(reps):
        core = build(config, policy, make, queued, r)
        out.append(timed(core.schedule, 0.0))
    return out


def time_steady(
    config: dict, policy: Policy, make: Callable, queued: int, reps: int, ends: int = 2
) -> list[float]:
    """Fill the pool, keep ``queued`` waiting, then per round end ``ends`` leases."""
    core = build(config, policy, make, queued, 0)
    rng = random.Random(1)
    core.schedule(0.0)
    n = queued
    out = []
    now = 0.0
    for _ in range(reps):
        now += 0.01
        for lease_id in rng.sample(sorted(core.leases), min(ends, len(core.leases))):
            core.release(lease_id, now)
        while core.queue_length < queued:  # keep the queue at its size
            core.submit(make(rng, n), now)
            n += 1
        out.append(timed(core.schedule, now))
    return out


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    return {"median_ms": statistics.median(xs) * 1e3, "p99_ms": p99 * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=60, help="rounds timed per situation")
    ap.add_argument("--cluster-queued", type=int, default=10_000)
    ap.add_argument("--policy", default="tangram")
    args = ap.parse_args()
    policies = [parse_policy(args.policy), parse_policy("paper"), Policy()]
    if args.policy == "paper":
        policies.pop(1)
    results: dict[str, dict[str, float]] = {}
    # (name, pools, action maker, queued, rounds timed cold, rounds timed steady)
    cases = [
        ("cpu256", CPU, cpu_action, args.queued, args.reps, args.reps),
        ("gpu40", GPU, gpu_action, args.queued, args.reps, args.reps),
        ("cluster16x256", CLUSTER, coding_action, args.cluster_queued, 5, 20),
    ]
    print(f"one scheduling round; {args.queued} queued ({args.cluster_queued} on the cluster)")
    print(f"{'case':<24}{'policy':<10}{'median ms':>11}{'p99 ms':>10}")
    for name, config, make, queued, cold_reps, steady_reps in cases:
        for situation, fn, reps in (
            ("cold", time_cold, cold_reps),
            ("steady", time_steady, steady_reps),
        ):
            for pol in policies:
                s = summary(fn(config, pol, make, queued, reps))
                results[f"{name}/{situation}/{pol.name}"] = s
                print(
                    f"{name + '/' + situation:<24}{pol.name:<10}"
                    f"{s['median_ms']:>11.3f}{s['p99_ms']:>10.3f}"
                )
    policy = policies[0]
    small = {k: v for k, v in results.items() if not k.startswith("cluster")}
    target = max(v["median_ms"] for k, v in small.items() if k.endswith("/" + policy.name))
    steady = results[f"cluster16x256/steady/{policy.name}"]["median_ms"]
    cold = results[f"cluster16x256/cold/{policy.name}"]["median_ms"]
    print(f"worst median for {policy.name}, 1,000 queued: {target:.3f} ms (target < 5 ms)")
    print(
        f"cluster, 10,000 queued: steady {steady:.3f} ms (target < 5 ms), "
        f"cold {cold:.1f} ms (target < 100 ms)"
    )
    print(
        json.dumps(
            {
                "benchmark": "scheduler",
                "queued": args.queued,
                "results": results,
                "worst_median_ms": target,
                "cluster_steady_median_ms": steady,
                "cluster_cold_median_ms": cold,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
