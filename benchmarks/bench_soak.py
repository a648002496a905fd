"""A bounded overload run: ten times more clients than units, a fixed number of cycles.

Each client loops ``async with broker.lease(action)`` around one yield to the event loop.
The run checks, as it goes, that no core is ever held by two leases (over-grants), and
at the end that every unit came back and nothing is left queued or held (leaks). It
samples the process's resident memory through the run: after a warm-up it must stay
flat. The same run is made with the lease journal off and on (SQLite, one commit per
round; every release durable before its client goes on), side by side. The last line
of output is JSON with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from tangram.broker import Broker
from tangram.config import parse_config
from tangram.spec import Action, Demand

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


async def soak(units: int, clients: int, cycles: int, data_dir: str | None) -> dict[str, Any]:
    cfg = parse_config(
        {"pools": {"cpu": {"kind": "cpu", "nodes": [
            {"name": "n", "cores": units, "numa": 2, "memory_gb": 1024}]}}}
    )  # fmt: skip
    broker = Broker.from_config(cfg, data_dir=data_dir)
    one = Demand.fixed(1)
    holder: dict[int, str] = {}
    over_grants = 0
    done = 0
    per = cycles // clients
    every = max(1, per * clients // 20)
    samples: list[float] = []

    async def client(i: int) -> None:
        nonlocal over_grants, done
        for _ in range(per):
            async with broker.lease(Action(trajectory=f"c{i}", demands={"cpu": one})) as lease:
                cores = lease.allocation["cpu"].units
                for c in cores:
                    if c in holder:
                        over_grants += 1
                    holder[c] = lease.id
                await asyncio.sleep(0)
                for c in cores:
                    holder.pop(c, None)
            # Every acknowledgement durable, as the HTTP door answers a release: the
            # client goes on only once its release is in the journal (group commit).
            await broker.sync()
            done += 1
            if done % every == 0:
                samples.append(rss_mb())

    gc.collect()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - t0
    await asyncio.sleep(0)  # the last release's round
    snap = broker.snapshot()
    await broker.close()
    leaked = snap["pools"]["cpu"]["in_use"] + snap["leases"] + snap["queued"]
    # Memory over the second half of the run. The first half fills what is bounded by
    # design: the core remembers the last 100,000 ended leases (for idempotent release
    # answers), about 15 MB, so a run of 400,000 cycles is on that plateau by midway.
    warm = samples[len(samples) // 2 :]
    head, tail = statistics.median(warm[:3]), statistics.median(warm[-3:])
    return {
        "journal": data_dir is not None,
        "cycles": per * clients,
        "cycles_per_second": per * clients / wall,
        "over_grants": over_grants,
        "leaked_units": leaked,
        "rss_mb_at_half": round(head, 1),
        "rss_mb_at_end": round(tail, 1),
        "rss_growth_mb": round(tail - head, 1),
        "journal_commits": broker.journal.commits if broker.journal is not None else 0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--clients", type=int, default=640, help="default: ten per unit")
    ap.add_argument("--cycles", type=int, default=400_000)
    ap.add_argument("--max-growth-mb", type=float, default=16.0,
                    help="RSS growth over the second half that still counts as flat")  # fmt: skip
    args = ap.parse_args()
    runs = [asyncio.run(soak(args.units, args.clients, args.cycles, None))]
    with tempfile.TemporaryDirectory() as d:
        runs.append(asyncio.run(soak(args.units, args.clients, args.cycles, d)))
    print(f"{args.clients} clients on {args.units} units, {runs[0]['cycles']} cycles per run")
    print(f"{'journal':<9}{'cycles/s':>10}{'over-grants':>13}{'leaked':>8}"
          f"{'RSS MB (half -> end)':>24}{'commits':>9}")  # fmt: skip
    for r in runs:
        rss = f"{r['rss_mb_at_half']} -> {r['rss_mb_at_end']}"
        print(f"{'on' if r['journal'] else 'off':<9}{r['cycles_per_second']:>10.0f}"
              f"{r['over_grants']:>13}{r['leaked_units']:>8}{rss:>24}"
              f"{r['journal_commits']:>9}")  # fmt: skip
    ok = all(
        r["over_grants"] == 0 and r["leaked_units"] == 0
        and r["rss_growth_mb"] <= args.max_growth_mb
        for r in runs
    )  # fmt: skip
    ratio = runs[1]["cycles_per_second"] / runs[0]["cycles_per_second"]
    print(f"journal on / off: {ratio:.2f}; "
          f"{'PASS' if ok else 'FAIL'}: zero over-grants, zero leaks, flat memory")  # fmt: skip
    print(json.dumps({"benchmark": "soak", "clients": args.clients, "units": args.units,
                      "runs": runs, "journal_ratio": ratio, "ok": ok}))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
