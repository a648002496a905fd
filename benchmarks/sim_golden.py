"""Simulated figures before and after a change that must not change behaviour.

``record DIR`` runs a set of ``tangram bench`` commands and saves every figure of their
``results.json`` files (wall times left out: they are the only figures that may move);
``compare DIR`` runs them again and reports every figure that differs. The simulator is
deterministic for a seed, so a refactoring of the core, its policies or its managers
must leave every figure exactly as it was.

    python benchmarks/sim_golden.py record /tmp/golden --set paper   # commands A to I
    python benchmarks/sim_golden.py compare /tmp/golden --set paper
    python benchmarks/sim_golden.py compare benchmarks/golden --set small   # make test

The ``paper`` set is docs/benchmarks.md's commands A to I (seed 0, several minutes);
``small`` is a few seconds of the same workloads and policies, recorded in
``benchmarks/golden/small.json`` and compared by ``tests/test_sim_golden.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# Figures that measure this machine, not the schedule.
WALL = {"wall_s", "sched_wall_s", "sched_overhead_mean_s"}

PAPER: dict[str, list[str]] = {
    "A": ["sim", "-w", "coding", "-p", "tangram", "-p", "k8s-pod", "-p", "min",
          "-p", "fixed:4", "-p", "fixed:16"],
    "B": ["sim", "-w", "coding", "-p", "tangram", "-p", "fixed:4", "-p", "fixed:16",
          "-b", "256", "--capacity", "1280"],
    "C": ["sim", "-w", "coding", "-p", "tangram", "-p", "fixed:4", "-p", "fixed:16",
          "-b", "1280", "--capacity", "1280"],
    "D": ["sim", "-w", "coding", "-p", "tangram", "-p", "fixed:4", "-p", "fixed:16",
          "-b", "1280", "--capacity", "768"],
    "E": ["sweep", "-w", "coding", "-p", "tangram", "-p", "k8s-pod", "--vary", "batch",
          "--values", "128,256,512,1024,1280,1536", "--capacity", "1280"],
    "F": ["sweep", "-w", "coding", "-p", "tangram", "-p", "k8s-pod", "--vary", "capacity",
          "--values", "768,1024,1280,1536,2048", "-b", "1280"],
    "G": ["sim", "-w", "deepsearch", "-p", "tangram", "-p", "naive-api", "-p",
          "naive-api:hang=0", "-p", "naive-api:hang=1"],
    "H": ["sweep", "-w", "mopd", "-p", "tangram", "-p", "static", "--vary", "batch",
          "--values", "64,256,1024,2048"],
    "I": ["sweep", "-w", "mixed", "-p", "tangram", "-p", "static", "--vary", "capacity",
          "--values", "8,10,12,16,24,40"],
}  # fmt: skip

SMALL: dict[str, list[str]] = {
    "coding": ["sim", "-w", "coding", "-p", "tangram", "-p", "paper", "-p", "k8s-pod",
               "-p", "min", "-p", "fixed:4", "-b", "48", "--capacity", "96"],
    "scarce": ["sim", "-w", "coding", "-p", "tangram", "-p", "paper", "-p", "fixed:2",
               "-b", "64", "--capacity", "32"],
    "deepsearch": ["sim", "-w", "deepsearch", "-p", "tangram", "-p", "naive-api", "-b", "64"],
    "mopd": ["sim", "-w", "mopd", "-p", "tangram", "-p", "static", "-b", "64"],
    "mixed": ["sim", "-w", "mixed", "-p", "tangram", "-p", "static", "-b", "32",
              "--capacity", "8"],
}  # fmt: skip

SETS = {"paper": PAPER, "small": SMALL}


def strip(x: Any) -> Any:
    """``x`` without wall times."""
    if isinstance(x, dict):
        return {k: strip(v) for k, v in x.items() if k not in WALL}
    if isinstance(x, list):
        return [strip(v) for v in x]
    return x


def run(name: str, argv: list[str]) -> dict[str, Any]:
    """Every results.json the command wrote, by path under its output directory."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "tangram.cli", "bench", *argv, "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        return {
            str(p.relative_to(out)): strip(json.loads(p.read_text()))
            for p in sorted(Path(out).rglob("results.json"))
        }


def diff(old: Any, new: Any, where: str, out: list[str]) -> None:
    """Every recorded figure that changed or disappeared. Figures only the new run has
    (a key added to results.json since the recording) are not differences: the
    comparison is over what was recorded."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(old):
            if k not in new:
                out.append(f"{where}/{k}: only in recorded")
            else:
                diff(old[k], new[k], f"{where}/{k}", out)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            diff(a, b, f"{where}[{i}]", out)
    elif isinstance(old, float) and isinstance(new, float):
        if not (old == new or (math.isnan(old) and math.isnan(new))):
            out.append(f"{where}: {old!r} -> {new!r}")
    elif old != new:
        out.append(f"{where}: {old!r} -> {new!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["record", "compare"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--set", choices=sorted(SETS), default="small")
    ap.add_argument("--only", default="", help="comma-separated command names of the set")
    args = ap.parse_args()
    commands = SETS[args.set]
    names = [n for n in args.only.split(",") if n] or list(commands)
    unknown = [n for n in names if n not in commands]
    if unknown:
        ap.error(f"no command {', '.join(unknown)} in set {args.set}: {', '.join(commands)}")
    path = args.dir / f"{args.set}.json"
    if args.mode == "record":
        recorded = json.loads(path.read_text()) if path.exists() else {}
        for n in names:
            recorded[n] = run(n, commands[n])
            print(f"{n}: recorded {len(recorded[n])} results", flush=True)
        args.dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return 0
    recorded = json.loads(path.read_text())
    bad = 0
    for n in names:
        found: list[str] = []
        diff(recorded[n], run(n, commands[n]), n, found)
        print(f"{n}: {'identical' if not found else f'{len(found)} figures differ'}", flush=True)
        for line in found[:20]:
            print("  " + line)
        bad += len(found)
    print(json.dumps({"benchmark": "sim_golden", "set": args.set, "differences": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
