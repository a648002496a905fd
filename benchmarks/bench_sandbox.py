"""What one trivial command (``true``) costs through each way of running it, side by
side: a bare child process, ``SandboxRunner`` (bubblewrap), and the container executor
(a whole action: cpuset update, thaw, ``runc exec``, kill the leftovers, freeze; and a
bare ``runc exec`` into the running container alone). Then what a trajectory's first
action costs to make its container: an overlay over the image, or (``--copy``, some
seconds per trajectory) a copy of it.

Bounded: a fixed number of runs each (a few seconds in all). Prints the median and p90
in milliseconds; the last line is JSON with every figure. What cannot run here (no
bubblewrap, no runc or image, not root) is reported as skipped, with the reason.

    .venv/bin/python benchmarks/bench_sandbox.py [--runs 30] [--copy] [--image oci:DIR:TAG]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tangram.executors.sandbox import Command

DEFAULT_IMAGE = "oci:/var/cache/tangram-image/sandbox-oci:bookworm"  # make sandbox-image
CORE = min(os.sched_getaffinity(0))


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(p90, 2), "n": len(ms)}


async def timed(runs: int, once: Callable[[], Awaitable[object]]) -> list[float]:
    await once()  # warm: first-use costs are not the per-command cost
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await once()
        out.append(time.perf_counter() - t0)
    return out


async def bare(runs: int) -> list[float]:
    async def once() -> None:
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()

    return await timed(runs, once)


async def bubblewrap(runs: int, tmp: Path) -> list[float]:
    from tangram.executors.sandbox import SandboxRunner, isolation_problem

    if (why := isolation_problem()) is not None:
        raise RuntimeError(why)
    r = SandboxRunner(tmp / "bwrap", trusted=True)

    async def once() -> None:
        res = await r.run("bench", Command(["true"]), [CORE])
        assert res.ok, res.stderr

    return await timed(runs, once)


async def containers(runs: int, tmp: Path, image: str, copy: bool) -> dict[str, list[float]]:
    from tangram.executors.container import ContainerRunner, runc_problem
    from tangram.executors.images import ImageStore

    if (why := runc_problem()) is not None:
        raise RuntimeError(why)
    store = ImageStore()  # the shared cache: unpacked once, not on every run
    store.get(image)
    out: dict[str, list[float]] = {}
    modes = [("overlay", True), ("copy", False)] if copy else [("overlay", True)]
    for mode, overlay in modes:
        r = ContainerRunner(tmp / mode, image=image, images=store, overlay=overlay, trusted=True)
        try:
            creates = []
            for i in range(3 if overlay else 1):
                t0 = time.perf_counter()
                res = await r.run(f"new{i}", Command(["true"]), [CORE])
                creates.append(time.perf_counter() - t0)
                assert res.ok and res.extra["rootfs"] == mode, res
                t0 = time.perf_counter()
                r.close_trajectory(f"new{i}")
                out.setdefault(f"close ({mode})", []).append(time.perf_counter() - t0)
            out[f"first action ({mode})"] = creates
            if not overlay:
                continue

            async def action(r: ContainerRunner = r) -> None:
                res = await r.run("bench", Command(["true"]), [CORE])
                assert res.ok, res.stderr

            out["container action"] = await timed(runs, action)
            # runc exec alone, into the thawed container (what the action adds to it).
            box = r.boxes["bench"]
            argv = ["runc", "--root", str(r.state_dir)]
            subprocess.run([*argv, "resume", box.cid], check=True)
            process = box.bundle / "exec.json"
            exec_argv = [*argv, "exec", "--process", str(process), box.cid]

            async def runc_exec(exec_argv: list[str] = exec_argv) -> None:
                proc = await asyncio.create_subprocess_exec(*exec_argv)
                await proc.wait()

            out["runc exec alone"] = await timed(runs, runc_exec)
            subprocess.run([*argv, "pause", box.cid], check=True)
        finally:
            r.kill_all()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--copy", action="store_true", help="also time a copied rootfs (slow)")
    ap.add_argument("--image", default=os.environ.get("TANGRAM_SANDBOX_IMAGE", DEFAULT_IMAGE))
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="tangram-bench-") as d:
        tmp = Path(d)
        results["bare subprocess"] = summary(await bare(args.runs))
        try:
            results["bubblewrap (SandboxRunner)"] = summary(await bubblewrap(args.runs, tmp))
        except Exception as exc:  # report and go on: the other rows still mean something
            skipped["bubblewrap (SandboxRunner)"] = str(exc)
        try:
            for name, samples in (await containers(args.runs, tmp, args.image, args.copy)).items():
                results[name] = summary(samples)
        except Exception as exc:
            skipped["container (runc)"] = str(exc)
    print(f"{'one `true`':<28} {'median ms':>10} {'p90 ms':>10} {'runs':>5}")
    for name, s in results.items():
        print(f"{name:<28} {s['median_ms']:>10.2f} {s['p90_ms']:>10.2f} {s['n']:>5}")
    for name, why in skipped.items():
        print(f"{name:<28} skipped: {why}")
    print(json.dumps({"results": results, "skipped": skipped}))


if __name__ == "__main__":
    asyncio.run(main())
