"""Acquire+release cycles per second in-process: the broker against asyncio.Semaphore.

1,000 concurrent clients share 64 units. Each cycle enters ``async with``, yields once to
the event loop inside (a stand-in for the external call, so clients really contend), and
leaves. The same loop runs through ``asyncio.Semaphore(64)`` as the reference, in the
same process, and the ratio is printed. Two broker pools: a quota pool with a
concurrency cap of 64 (plain permits) and a CPU pool of 64 cores (exact core ids, a
trajectory pinned per client). The last line of output is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable

from tangram.broker import Broker
from tangram.config import parse_config
from tangram.spec import Action, Demand

POOLS = {
    "permits": {"kind": "quota", "concurrency": 64},
    "cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": 64, "numa": 2, "memory_gb": 512}]},
}


async def drive(clients: int, cycles: int, one: Callable[[int], Awaitable[None]]) -> float:
    per = cycles // clients

    async def client(i: int) -> None:
        for _ in range(per):
            await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return per * clients / (time.perf_counter() - t0)


async def semaphore_rate(clients: int, cycles: int) -> float:
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await asyncio.sleep(0)

    return await drive(clients, cycles, one)


async def broker_rate(pool: str, clients: int, cycles: int) -> tuple[float, Broker]:
    broker = Broker.from_config(parse_config({"pools": {pool: POOLS[pool]}}))
    one_unit = Demand.fixed(1)

    async def one(i: int) -> None:
        action = Action(trajectory=f"t{i}", demands={pool: one_unit})
        async with broker.lease(action):
            await asyncio.sleep(0)

    rate = await drive(clients, cycles, one)
    await broker.close()
    return rate, broker


async def main_async(clients: int, cycles: int, rounds: int) -> dict[str, object]:
    await semaphore_rate(clients, cycles // 4)  # warm up
    figures: dict[str, list[float]] = {"semaphore": [], "permits": [], "cpu": []}
    for _ in range(rounds):  # interleaved, so drift in machine load hits all alike
        figures["semaphore"].append(await semaphore_rate(clients, cycles))
        for pool in ("permits", "cpu"):
            rate, broker = await broker_rate(pool, clients, cycles)
            snap = broker.snapshot()
            assert snap["leases"] == 0 and snap["queued"] == 0, "units leaked"
            figures[pool].append(rate)
    best = {k: max(v) for k, v in figures.items()}
    return {
        "cycles_per_second": best,
        "ratio_permits": best["permits"] / best["semaphore"],
        "ratio_cpu": best["cpu"] / best["semaphore"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=100_000, help="cycles per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per contender (best kept)")
    args = ap.parse_args()
    res = asyncio.run(main_async(args.clients, args.cycles, args.rounds))
    rates = res["cycles_per_second"]
    assert isinstance(rates, dict)
    print(f"{args.clients} clients, 64 units, {args.cycles} cycles per run, best of {args.rounds}")
    print(f"{'contender':<28}{'cycles/s':>12}{'vs semaphore':>14}")
    print(f"{'asyncio.Semaphore(64)':<28}{rates['semaphore']:>12.0f}{1.0:>14.2f}")
    print(f"{'broker, quota pool':<28}{rates['permits']:>12.0f}{res['ratio_permits']:>14.2f}")
    print(f"{'broker, cpu pool':<28}{rates['cpu']:>12.0f}{res['ratio_cpu']:>14.2f}")
    print("target: broker >= 0.2 x semaphore")
    print(json.dumps({"benchmark": "broker", "clients": args.clients, **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
