"""``tangram bench live``: a small coding workload run for real on this machine.

Each trajectory alternates a generation gap (the LLM thinking: a sleep) with real sandbox
actions in its working directory: write a file, run a Python snippet, run the pytest
suite that ships with the package (``tangram/ray/live_suite``, with ``-n {dop}``
through pytest-xdist when it is installed). The same workload runs twice on the same
cores:

- ``tangram``: every action is its own lease (elastic on the suite run), so cores are
  held only while a command runs;
- ``reservation``: each trajectory reserves a fixed share of the cores for its whole
  life (gaps included) and runs every action on them, as stacks that bind sandboxes to
  trajectories do; trajectories beyond the cores wait for a reservation.

The command object is ``tangram.cli.live_command``, apart from this module so that
building the CLI does not import Ray.

It prints the average action completion time (ACT: from the moment the trajectory wants
the action to its result, queueing included) and the step time (until every trajectory
is done), and ends with one line of JSON.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

import tangram.ray as tr
from tangram.executors.sandbox import Command, isolation_problem
from tangram.spec import Action, Lease

# The "agent's repo" the workload tests: files shipped into sandboxes, not modules of
# Tangram (its tests import ``solution`` from their own directory). It ships with the
# package, so the benchmark runs the same suite from a checkout and from a wheel.
SUITE_DIR = Path(__file__).resolve().parent / "live_suite"
SNIPPET = (
    "import json, math\n"
    "print(json.dumps({'primes': [n for n in range(2, 20000) "
    "if all(n % d for d in range(2, int(math.isqrt(n)) + 1))][-1]}))\n"
)


def suite_files() -> dict[str, str]:
    """The suite's files by name, to write into a trajectory's working directory."""
    return {p.name: p.read_text() for p in sorted(SUITE_DIR.glob("*.py"))}


@dataclass(slots=True)
class Workload:
    trajectories: int = 4
    steps: int = 2
    gap: float = 2.0  # mean generation gap, seconds
    seed: int = 0
    xdist: bool = True
    cores: list[int] = field(default_factory=lambda: sorted(os.sched_getaffinity(0)))

    def actions(self, step: int, max_dop: int) -> list[tuple[str, dict[str, Any], Command]]:
        """(kind, action fields, command) of one step, in order."""
        # The suite is the "agent's repo": plugins installed beside Tangram (hypothesis,
        # schemathesis) have no business there, and loading them took 4 of 5 seconds.
        suite = (
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {python} -m pytest -q -p no:cacheprovider "
            "-o python_files='check_*.py'"
        )
        if self.xdist and importlib.util.find_spec("xdist") is not None:
            suite += " -p xdist.plugin -n {dop}"
        files = suite_files() if step == 0 else None  # the repo is there from step 1 on
        return [
            (
                "write",
                {"duration": 0.05},
                Command(f"echo 'step {step}' >> notes.txt", files=files, timeout=60),
            ),
            ("snippet", {"duration": 0.3}, Command('{python} -c "$SNIPPET"', timeout=120)),
            (
                "suite",
                {
                    "demands": {"cpu": (1, max_dop)},
                    "key": "cpu",
                    "duration": 4.0,
                    "efficiency": {"amdahl": 0.6},
                },
                Command(suite + " .", timeout=300),
            ),
        ]


@dataclass(slots=True)
class Outcome:
    acts: dict[str, list[float]] = field(default_factory=dict)
    failures: int = 0
    step_seconds: float = 0.0

    def record(self, kind: str, seconds: float, ok: bool) -> None:
        self.acts.setdefault(kind, []).append(seconds)
        self.failures += not ok

    def summary(self) -> dict[str, Any]:
        every = [x for v in self.acts.values() for x in v]
        return {
            "act_mean_seconds": round(statistics.fmean(every), 3) if every else None,
            "act_by_label_seconds": {
                k: round(statistics.fmean(v), 3) for k, v in self.acts.items()
            },
            "step_seconds": round(self.step_seconds, 3),
            "actions": len(every),
            "failures": self.failures,
        }


def _gaps(w: Workload) -> list[list[float]]:
    rng = random.Random(w.seed)  # both modes wait exactly the same gaps
    return [[rng.uniform(0.5, 1.5) * w.gap for _ in range(w.steps)] for _ in range(w.trajectories)]


async def _tangram(client: tr.Client, w: Workload, run_id: str) -> Outcome:
    out = Outcome()
    gaps = _gaps(w)

    async def trajectory(i: int) -> None:
        name = f"live-{run_id}-t{i}"
        try:
            for step in range(w.steps):
                await asyncio.sleep(gaps[i][step])
                for kind, fields, cmd in w.actions(step, len(w.cores)):
                    demands = fields.pop("demands", {"cpu": 1})
                    act = Action.build(name, demands, **fields)
                    t0 = time.monotonic()
                    res = await client.run(act, _env(cmd))
                    out.record(kind, time.monotonic() - t0, res.ok)
        finally:
            await client.close_trajectory(name)

    t0 = time.monotonic()
    await asyncio.gather(*(trajectory(i) for i in range(w.trajectories)))
    out.step_seconds = time.monotonic() - t0
    return out


async def _reservation(client: tr.Client, w: Workload, run_id: str) -> Outcome:
    out = Outcome()
    gaps = _gaps(w)
    share = max(1, len(w.cores) // w.trajectories)  # each trajectory's fixed cores

    async def trajectory(i: int) -> None:
        name = f"resv-{run_id}-t{i}"
        asked = time.monotonic()
        # The whole trajectory's reservation; heartbeats keep it through the gaps.
        whole = Action.build(name, {"cpu": share})
        try:
            async with client.lease(whole) as lease:
                waited = time.monotonic() - asked
                for step in range(w.steps):
                    await asyncio.sleep(gaps[i][step])
                    for kind, _, cmd in w.actions(step, share):
                        t0 = time.monotonic()
                        res = await _run_on(client, lease, cmd)
                        # Waiting for the reservation delays the first action.
                        out.record(kind, time.monotonic() - t0 + waited, res.ok)
                        waited = 0.0
        finally:
            await client.close_trajectory(name)

    t0 = time.monotonic()
    await asyncio.gather(*(trajectory(i) for i in range(w.trajectories)))
    out.step_seconds = time.monotonic() - t0
    return out


def _env(cmd: Command) -> Command:
    return Command(cmd.command, timeout=cmd.timeout, files=cmd.files, env={"SNIPPET": SNIPPET})


async def _run_on(client: tr.Client, lease: Lease, cmd: Command) -> Any:
    return await client.run_on(lease, _env(cmd))


def live(
    trajectories: int = 4,
    steps: int = 2,
    gap: float = 2.0,
    seed: int = 0,
    xdist: bool = True,
    cores: list[int] | None = None,
    sandbox: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the workload under both modes on a broker of its own; return the figures.
    ``sandbox`` is the CPU pool's sandbox section (default: bubblewrap working
    directories; ``{"backend": "container", "image": ...}`` for a container per
    trajectory)."""
    if trajectories < 1 or steps < 1 or gap < 0:
        raise ValueError("trajectories and steps must be at least 1, gap at least 0")
    w = Workload(trajectories, steps, gap, seed, xdist)
    if cores is not None:
        missing = sorted(set(cores) - set(w.cores))
        if not cores or missing:
            raise ValueError(f"cores {missing or cores} are not usable here ({w.cores})")
        w.cores = sorted(cores)
    tr.ensure_ray()
    run_id = uuid.uuid4().hex[:6]
    name = f"tangram-live-{run_id}"
    pool: dict[str, Any] = {
        "kind": "cpu",
        "nodes": [{"name": "local", "cores": w.cores, "memory_gb": 4}],
    }
    if sandbox:
        pool["sandbox"] = dict(sandbox)
    pools = {"cpu": pool}
    results: dict[str, Any] = {}
    root = tempfile.mkdtemp(prefix="tangram-live-")
    try:
        # Only the project's own commands run here: isolated where bubblewrap is there
        # (so the timings include its cost), plain where it is not.
        tr.start_broker(
            {"pools": pools},
            name=name,
            detached=False,
            sandbox_root=root,
            sandbox_isolate=isolation_problem() is None,
        )

        async def both() -> None:
            client = tr.Client(name=name)
            try:
                results["tangram"] = (await _tangram(client, w, run_id)).summary()
                results["reservation"] = (await _reservation(client, w, run_id)).summary()
            finally:
                await client.aclose()

        asyncio.run(both())
    finally:
        tr.stop_broker(name)
        shutil.rmtree(root, ignore_errors=True)
    t, r = results["tangram"], results["reservation"]
    return {
        "bench": "live",
        "trajectories": trajectories,
        "steps": steps,
        "gap_seconds": gap,
        "cores": w.cores,
        "sandbox": (sandbox or {}).get("backend", "bubblewrap"),
        "node": ray.get_runtime_context().get_node_id(),
        "tangram": t,
        "reservation": r,
        "act_speedup": round(r["act_mean_seconds"] / t["act_mean_seconds"], 3),
        "step_speedup": round(r["step_seconds"] / t["step_seconds"], 3),
    }


def format_report(out: dict[str, Any]) -> str:
    t, r = out["tangram"], out["reservation"]
    lines = [
        f"live coding workload: {out['trajectories']} trajectories x {out['steps']} steps, "
        f"gap {out['gap_seconds']:g} s, cores {out['cores']}, sandbox {out['sandbox']}",
        f"{'mode':12s} {'ACT mean':>10s} {'step time':>10s} {'actions':>8s} {'failures':>9s}",
    ]
    for name, s in (("tangram", t), ("reservation", r)):
        lines.append(
            f"{name:12s} {s['act_mean_seconds']:9.2f}s {s['step_seconds']:9.2f}s "
            f"{s['actions']:8d} {s['failures']:9d}"
        )
    lines.append(
        f"reservation / tangram: ACT {out['act_speedup']:.2f}x, "
        f"step time {out['step_speedup']:.2f}x"
    )
    return "\n".join(lines)
