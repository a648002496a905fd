"""``tangram bench ...``: simulate the paper's workloads and baselines over the real core.

Commands: ``sim`` (a generated workload), ``replay`` (a JSONL trace), ``sweep`` (vary
batch size or pool capacity), ``workloads`` (list the workloads and their parameters).
Each writes ``results.json`` and PNG plots into ``--out`` and prints a comparison table.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tangram.config import ConfigError, load_config
from tangram.sim import report
from tangram.sim.baselines.k8s_pod import PodParams
from tangram.sim.baselines.naive_api import NaiveApiParams
from tangram.sim.baselines.static import StaticParams
from tangram.sim.engine import SimulationStuck
from tangram.sim.run import act_series, check_policy, simulate
from tangram.sim.trace import TraceError, TrajectorySpec, read_trace, write_trace
from tangram.sim.workloads import WORKLOADS, CodingParams, DeepSearchParams, MopdParams, generate
from tangram.spec import TangramError

bench_app = typer.Typer(
    help="Benchmarks: simulate the paper's workloads and baselines over the real scheduler.",
    no_args_is_help=True,
)
# Wide enough for the comparison table when output goes to a file or a pipe.
console = Console(width=None if Console().is_terminal else 150)

PolicyOpt = Annotated[
    list[str],
    typer.Option(
        "--policy",
        "-p",
        help="repeatable: tangram[:depth=N,lookahead=N], min, fixed:K, k8s-pod, static[:K], "
        "naive-api[:hang=F]",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="pool configuration YAML (default: the workload's)"),
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="directory for results.json and PNGs")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed of the workload")]
CapacityOpt = Annotated[
    int | None,
    typer.Option(
        "--capacity",
        help="resize the first CPU/GPU pool (or --pool) to this many units, in whole nodes",
    ),
]
PoolOpt = Annotated[
    str | None, typer.Option("--pool", help="the pool --capacity resizes (default: first cpu/gpu)")
]
CheckOpt = Annotated[
    bool, typer.Option("--check", help="check capacity and unit exclusivity after every round")
]


def _fail(msg: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(2)


def _pools(config: Path | None, workload: str | None) -> dict[str, Any]:
    if config is not None:
        try:
            return load_config(config).model_dump(exclude_none=True)
        except (ConfigError, OSError) as exc:
            raise _fail(str(exc)) from None
    if workload is None:
        raise _fail("give --config POOLS.yaml or --workload W (for its default pools)")
    return copy.deepcopy(WORKLOADS[workload].pools)


def _target_pool(pools: dict[str, Any], pool: str | None) -> str:
    if pool is not None:
        return pool
    return next((n for n, p in pools["pools"].items() if p.get("kind") in ("cpu", "gpu")), "")


def _resized(pools: dict[str, Any], pool: str | None, capacity: int | None) -> dict[str, Any]:
    if capacity is None:
        return pools
    try:
        return scale_pool(pools, _target_pool(pools, pool), capacity)
    except ValueError as exc:
        raise _fail(str(exc)) from None


def _check_workload(name: str) -> None:
    if name not in WORKLOADS:
        raise _fail(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")


def _check_policies(policies: list[str]) -> list[str]:
    if not policies:
        raise _fail("give at least one --policy")
    for p in policies:
        try:
            check_policy(p)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    return policies


def busy_fraction(trajs: list[TrajectorySpec]) -> float:
    """Share of a trajectory's life spent in actions at their minimum allocation, no
    queueing (paper: 47% in production coding)."""
    busy = sum(a.duration for t in trajs for a in t.actions)
    gaps = sum(a.gap for t in trajs for a in t.actions)
    return busy / (busy + gaps) if busy + gaps > 0 else 0.0


def run_policies(
    trajs: list[TrajectorySpec],
    pools: dict[str, Any],
    policies: list[str],
    seed: int,
    check: bool,
    quiet: bool = False,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    series = {}
    total = sum(len(t.actions) for t in trajs)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    ) as prog:
        for pol in policies:
            task = prog.add_task(f"{pol:>10}", total=total)

            def tick(n: int, task: Any = task) -> None:
                prog.update(task, completed=n)

            try:
                res, runner = simulate(trajs, pools, pol, seed=seed, check=check, progress=tick)
            except (ValueError, ConfigError, SimulationStuck, TangramError) as exc:
                raise _fail(f"policy {pol}: {exc}") from None
            prog.update(task, completed=total)
            results[pol] = res
            series[pol] = act_series(runner)
            if not quiet:
                console.print(
                    f"{pol}: {res['actions']} actions simulated in {res['wall_s']:.2f} s wall"
                )
    return results, series


def _write(
    out: Path,
    meta: dict[str, Any],
    results: dict[str, dict[str, Any]],
    series: dict[str, Any],
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", {**meta, "policies": results})
    report.plot_act_over_time(series, out / "act_over_time.png")
    report.plot_act_split(results, out / "act_split.png")
    console.print(f"wrote {out / 'results.json'}, act_over_time.png, act_split.png")


@bench_app.command("sim")
def sim(
    workload: Annotated[
        str, typer.Option("--workload", "-w", help="coding, deepsearch, mopd or mixed")
    ] = "coding",
    policy: PolicyOpt = ["tangram"],  # noqa: B006 (typer reads the default, never mutates it)
    config: ConfigOpt = None,
    batch: Annotated[
        int | None, typer.Option("--batch", "-b", help="trajectories per step (default: paper's)")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", "-s", help="RL steps", min=1)] = 1,
    seed: SeedOpt = 0,
    out: OutOpt = Path("bench-out"),
    save_trace: Annotated[
        Path | None, typer.Option("--save-trace", help="write the generated workload as JSONL")
    ] = None,
    ref: Annotated[
        str | None,
        typer.Option("--ref", help="policy the ratios are taken against (default: first)"),
    ] = None,
    capacity: CapacityOpt = None,
    pool: PoolOpt = None,
    check: CheckOpt = False,
) -> None:
    """Generate a workload and run it under each policy; print a table, write results."""
    _check_workload(workload)
    policies = _check_policies(policy)
    pools = _resized(_pools(config, workload), pool, capacity)
    t0 = time.perf_counter()
    trajs = generate(workload, batch, steps, seed)
    if save_trace is not None:
        write_trace(save_trace, trajs)
        console.print(f"wrote trace {save_trace}")
    bf = busy_fraction(trajs)
    console.print(
        f"workload {workload}: {len(trajs)} trajectories, "
        f"{sum(len(t.actions) for t in trajs)} actions, busy fraction {bf:.2f} at minimum"
    )
    results, series = run_policies(trajs, pools, policies, seed, check)
    console.print(
        report.table(
            results, f"{workload}, batch {batch or WORKLOADS[workload].batch}", ref or policies[0]
        )
    )
    meta = {
        "workload": workload,
        "batch": batch or WORKLOADS[workload].batch,
        "steps": steps,
        "seed": seed,
        "busy_fraction": bf,
        "pools": pools,
    }
    _write(out, meta, results, series)
    console.print(f"total wall time {time.perf_counter() - t0:.2f} s")


@bench_app.command("replay")
def replay(
    trace: Annotated[Path, typer.Argument(help="JSONL trace (see docs/trace-format.md)")],
    policy: PolicyOpt = ["tangram"],  # noqa: B006
    config: ConfigOpt = None,
    workload: Annotated[
        str | None, typer.Option("--workload", "-w", help="use this workload's default pools")
    ] = None,
    seed: SeedOpt = 0,
    out: OutOpt = Path("bench-out"),
    ref: Annotated[str | None, typer.Option("--ref", help="policy for the ratio columns")] = None,
    capacity: CapacityOpt = None,
    pool: PoolOpt = None,
    check: CheckOpt = False,
) -> None:
    """Replay a recorded trace under each policy; print a table, write results."""
    if workload is not None:
        _check_workload(workload)
    policies = _check_policies(policy)
    pools = _resized(_pools(config, workload), pool, capacity)
    t0 = time.perf_counter()
    try:
        trajs = read_trace(trace)
    except (TraceError, OSError) as exc:
        raise _fail(str(exc)) from None
    bf = busy_fraction(trajs)
    console.print(
        f"trace {trace}: {len(trajs)} trajectories, "
        f"{sum(len(t.actions) for t in trajs)} actions, busy fraction {bf:.2f} at minimum"
    )
    results, series = run_policies(trajs, pools, policies, seed, check)
    console.print(report.table(results, f"replay {trace.name}", ref or policies[0]))
    meta = {"trace": str(trace), "seed": seed, "busy_fraction": bf, "pools": pools}
    _write(out, meta, results, series)
    console.print(f"total wall time {time.perf_counter() - t0:.2f} s")


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


@bench_app.command("sweep")
def sweep(
    workload: Annotated[str, typer.Option("--workload", "-w")] = "coding",
    policy: PolicyOpt = ["tangram"],  # noqa: B006
    vary: Annotated[str, typer.Option("--vary", help="batch or capacity")] = "batch",
    values: Annotated[
        str, typer.Option("--values", help="comma-separated batch sizes or unit counts")
    ] = "128,256,512,1024",
    pool: PoolOpt = None,
    capacity: CapacityOpt = None,
    batch: Annotated[
        int | None, typer.Option("--batch", "-b", help="batch when varying capacity")
    ] = None,
    config: ConfigOpt = None,
    steps: Annotated[int, typer.Option("--steps", "-s", min=1)] = 1,
    seed: SeedOpt = 0,
    out: OutOpt = Path("bench-out"),
    check: CheckOpt = False,
) -> None:
    """Vary batch size or pool capacity; plot mean ACT per policy (the scalability figure)."""
    _check_workload(workload)
    policies = _check_policies(policy)
    if vary not in ("batch", "capacity"):
        raise _fail("--vary is batch or capacity")
    try:
        xs = [int(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise _fail(f"--values {values!r}: write whole numbers separated by commas") from None
    if not xs or min(xs) < 1:
        raise _fail("--values needs at least one positive number")
    if vary == "capacity" and capacity is not None:
        raise _fail("--capacity fixes the capacity; it cannot be combined with --vary capacity")
    pools = _resized(_pools(config, workload), pool, capacity)
    target = _target_pool(pools, pool)
    t0 = time.perf_counter()
    points: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {p: [] for p in policies}
    sized: dict[int, dict[str, Any]] = {}
    if vary == "capacity":  # every size checked before any simulation runs
        for x in xs:
            try:
                sized[x] = scale_pool(pools, target, x)
            except ValueError as exc:
                raise _fail(str(exc)) from None
    fixed_trajs = generate(workload, batch, steps, seed) if vary == "capacity" else None
    for x in xs:
        if vary == "batch":
            trajs, cfg = generate(workload, x, steps, seed), pools
        else:
            assert fixed_trajs is not None
            trajs, cfg = fixed_trajs, sized[x]
        console.print(f"[bold]{vary} = {x}[/bold]")
        results, _ = run_policies(trajs, cfg, policies, seed, check)
        console.print(report.table(results, f"{workload}, {vary} {x}", policies[0]))
        points.append({vary: x, "policies": results})
        for p in policies:
            curves[p].append(results[p]["act_mean_s"])
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "workload": workload,
        "vary": vary,
        "pool": target if vary == "capacity" else None,
        "batch": batch,
        "steps": steps,
        "seed": seed,
        "pools": pools,
    }
    report.write_json(out / "results.json", {**meta, "points": points})
    label = "batch size (trajectories per step)" if vary == "batch" else f"units of pool {target}"
    report.plot_sweep([float(x) for x in xs], curves, label, out / "sweep.png")
    console.print(f"wrote {out / 'results.json'}, sweep.png")
    console.print(f"total wall time {time.perf_counter() - t0:.2f} s")


@bench_app.command("workloads")
def workloads() -> None:
    """List the workloads and baselines with their parameters (see tangram/sim/workloads.py
    and tangram/sim/baselines/ for the paper fact or assumption behind each)."""
    for name, params in (
        ("coding", CodingParams()),
        ("deepsearch", DeepSearchParams()),
        ("mopd", MopdParams()),
    ):
        console.print(f"[bold]{name}[/bold]: {dataclasses.asdict(params)}")
        console.print(f"  pools: {list(WORKLOADS[name].pools['pools'])}")
    console.print("[bold]mixed[/bold]: mopd and deepsearch, half the batch each, one GPU pool")
    for name, base in (
        ("k8s-pod", PodParams()),
        ("static", StaticParams()),
        ("naive-api", NaiveApiParams()),
    ):
        console.print(f"[bold]baseline {name}[/bold]: {dataclasses.asdict(base)}")
