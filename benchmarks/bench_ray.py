"""Actions per second on Ray: the Tangram Ray client against Ray's native resources.

Both sides share one local Ray cluster with ``UNITS`` units of a custom resource
``sandbox``. An action is: hold one unit, do trivial work, give the unit back.

- Tangram: ``async with client.lease(action)`` around ``await asyncio.sleep(0)``, from
  ``CONCURRENCY`` concurrent coroutines, against the broker actor (a quota pool of
  ``UNITS`` permits). Once with one client in the driver, once with the coroutines
  spread over 4 Ray actors with a client each (how rollout workers would use it).
- Ray native: a task ``@ray.remote(num_cpus=0, resources={"sandbox": 1})`` that returns
  at once; Ray holds the unit for the call. Once submitting every task at once and
  waiting for all (Ray's best case), once from ``CONCURRENCY`` coroutines awaiting one
  task after another (the same shape as the Tangram loop).

Warm-up first (Ray starts its worker processes), then ``--rounds`` interleaved rounds
with ``--settle`` seconds of rest before each contender; the best round of each counts.
The last line of output is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import ray

import tangram.ray as tr
from tangram.spec import Action

BROKER = "bench"


@ray.remote(num_cpus=0, resources={"sandbox": 1})
def trivial() -> None:
    return None


async def tangram_loops(client: tr.Client, concurrency: int, per: int) -> None:
    async def loop(i: int) -> None:
        traj = f"w{i}"
        for _ in range(per):
            async with client.lease(Action.build(traj, {"sandbox": 1})):
                await asyncio.sleep(0)

    await asyncio.gather(*(loop(i) for i in range(concurrency)))


@ray.remote(num_cpus=0)
class Driver:
    """A rollout worker with its own client."""

    def __init__(self) -> None:
        self.client = tr.Client(name=BROKER)

    async def run(self, concurrency: int, per: int) -> float:
        t0 = time.perf_counter()
        await tangram_loops(self.client, concurrency, per)
        return time.perf_counter() - t0


def tangram_driver(actions: int, concurrency: int) -> float:
    async def main() -> float:
        client = tr.Client(name=BROKER)
        per = actions // concurrency
        t0 = time.perf_counter()
        await tangram_loops(client, concurrency, per)
        took = time.perf_counter() - t0
        await client.aclose()
        return per * concurrency / took

    return asyncio.run(main())


def tangram_actors(drivers: list[Any], actions: int, concurrency: int) -> float:
    per = actions // concurrency
    each = concurrency // len(drivers)
    t0 = time.perf_counter()
    ray.get([d.run.remote(each, per) for d in drivers])
    return per * each * len(drivers) / (time.perf_counter() - t0)


def native_batch(actions: int) -> float:
    t0 = time.perf_counter()
    ray.get([trivial.remote() for _ in range(actions)])
    return actions / (time.perf_counter() - t0)


def native_loops(actions: int, concurrency: int) -> float:
    per = actions // concurrency

    async def main() -> float:
        async def loop() -> None:
            for _ in range(per):
                await trivial.remote()

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return per * concurrency / (time.perf_counter() - t0)

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actions", type=int, default=10_000, help="actions per contender per round")
    ap.add_argument("--concurrency", type=int, default=256, help="concurrent actions in flight")
    ap.add_argument("--units", type=int, default=64, help="units of the sandbox resource")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of rest before each contender (Ray reaps idle workers meanwhile)",
    )
    args = ap.parse_args(argv)

    ray.init(
        num_cpus=args.cpus,
        resources={"sandbox": args.units},
        include_dashboard=False,
        log_to_driver=False,
    )
    pools = {"sandbox": {"kind": "quota", "concurrency": args.units}}
    tr.start_broker({"pools": pools}, name=BROKER, detached=False, executors=False)
    drivers = [Driver.remote() for _ in range(4)]  # type: ignore[attr-defined]

    warm = min(args.actions, 2_000)
    native_batch(warm)
    native_loops(warm, args.concurrency)
    tangram_driver(warm, args.concurrency)
    tangram_actors(drivers, warm, args.concurrency)

    contenders = {
        "ray_native_batch": lambda: native_batch(args.actions),
        "ray_native_loops": lambda: native_loops(args.actions, args.concurrency),
        "tangram_driver": lambda: tangram_driver(args.actions, args.concurrency),
        "tangram_4_actors": lambda: tangram_actors(drivers, args.actions, args.concurrency),
    }
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, fn in contenders.items():
            # After a burst of native tasks Ray reaps dozens of idle worker processes,
            # which slowed whichever contender ran next by up to 4x on 2 cores.
            time.sleep(args.settle)
            rate = fn()
            best[name] = max(best.get(name, 0.0), rate)
            print(f"round {r + 1}: {name:18s} {rate:10,.0f} actions/s", file=sys.stderr)

    native = max(best["ray_native_batch"], best["ray_native_loops"])
    tangram = max(best["tangram_driver"], best["tangram_4_actors"])
    print()
    print(f"{'contender':22s} {'actions/s':>12s} {'vs best native':>15s}")
    for name, rate in best.items():
        print(f"{name:22s} {rate:12,.0f} {rate / native:15.2f}")
    print(f"\nTangram / Ray native (best of each): {tangram / native:.2f}")
    tr.stop_broker(BROKER)
    ray.shutdown()
    out = {
        "bench": "ray",
        "actions": args.actions,
        "concurrency": args.concurrency,
        "units": args.units,
        "rounds": args.rounds,
        "settle_seconds": args.settle,
        "actions_per_second": {k: round(v, 1) for k, v in best.items()},
        "ratio_tangram_vs_native": round(tangram / native, 3),
        "target_met": tangram >= native,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
