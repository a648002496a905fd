"""``tangram bench ...``: simulate the paper's workloads and baselines over the real core.

Commands: ``sim`` (a generated workload), ``replay`` (a JSONL trace), ``sweep`` (vary
batch size or pool capacity), ``matrix`` (a grid of workloads, batches, capacities and
seeds against fixed parallelism; tangram/sim/matrix.py), ``workloads`` (list the
workloads and their parameters). Each writes ``results.json`` (``matrix``:
``matrix.json``) into ``--out`` and prints a comparison table; with ``--json`` stdout
carries only that document (``workloads``: the parameters), everything else goes to
stderr. Progress bars go to stderr and vanish when done.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tangram.config import ConfigError, load_config
from tangram.sim import matrix, report
from tangram.sim.baselines.k8s_pod import PodParams
from tangram.sim.baselines.naive_api import NaiveApiParams
from tangram.sim.baselines.static import StaticParams
from tangram.sim.engine import SimulationStuck
from tangram.sim.run import (
    act_series,
    check_policy,
    declare_durations,
    main_pool,
    scale_pool,
    simulate,
)
from tangram.sim.trace import TraceError, TrajectorySpec, read_trace, write_trace
from tangram.sim.workloads import (
    WORKLOADS,
    CodingLongParams,
    CodingParams,
    CodingShortParams,
    DeepSearchParams,
    MopdParams,
    generate,
    without_batching,
)
from tangram.spec import TangramError

bench_app = typer.Typer(
    help="Benchmarks: simulate the paper's workloads and baselines over the real scheduler.",
    no_args_is_help=True,
)
# Wide enough for the comparison table when output goes to a file or a pipe.
console = Console(width=None if Console().is_terminal else 150)
# Errors and progress bars go to stderr, apart from the results.
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


def _json_aware(fn: F) -> F:
    """A command with a ``json_out`` (``--json``) option: while it runs, everything
    ``console`` prints goes to stderr, so that stdout carries only the JSON document."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        before = console.stderr
        console.stderr = before or bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        finally:
            console.stderr = before

    return cast(F, wrapper)


def _emit_json(payload: dict[str, Any]) -> None:
    """The one document ``--json`` prints: the text written to results.json/matrix.json."""
    typer.echo(report.dumps(payload), nl=False)


@contextmanager
def _progress(quiet: bool = False) -> Iterator[Progress]:
    """The progress display of every command, on stderr, gone when it ends."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=quiet,
    ) as prog:
        yield prog


def _finite(value: float | None) -> float | None:
    """An option callback: ``nan`` and ``inf`` parse as floats but mean nothing here."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


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
    typer.Option(
        "--config",
        "-c",
        exists=True,
        dir_okay=False,
        readable=True,
        help="pool configuration YAML (default: the workload's)",
    ),
]
OutOpt = Annotated[
    Path,
    typer.Option("--out", "-o", file_okay=False, help="directory for results.json and PNGs"),
]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, help="random seed of the workload")]
CapacityOpt = Annotated[
    int | None,
    typer.Option(
        "--capacity",
        min=1,
        help="resize the first CPU/GPU pool (or --pool) to this many units, in whole nodes",
    ),
]
PoolOpt = Annotated[
    str | None, typer.Option("--pool", help="the pool --capacity resizes (default: first cpu/gpu)")
]
CheckOpt = Annotated[
    bool, typer.Option("--check", help="check capacity and unit exclusivity after every round")
]
DurationErrorOpt = Annotated[
    float,
    typer.Option(
        "--duration-error",
        min=0.0,
        callback=_finite,
        help="SIGMA: each action declares to the scheduler its true duration times "
        "exp(N(0, SIGMA)), drawn from an RNG apart from the workload's (same workload); "
        "execution follows the true duration. 0: declared durations are exact",
    ),
]
HideDurationsOpt = Annotated[
    bool,
    typer.Option(
        "--hide-durations",
        help="actions declare no duration at all (efficiency curves stay known): the "
        "scheduler has only what it observes",
    ),
]
NoBatchingOpt = Annotated[
    bool,
    typer.Option(
        "--no-batching",
        help="GPU services take one request per instance (max_concurrency 1, no batching "
        "curve): the model before request slots, for comparison",
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="print only the results (what results.json holds) as one JSON document on "
        "stdout; tables and messages go to stderr",
    ),
]
WORKLOAD_HELP = "one of: " + ", ".join(WORKLOADS)


def _batching(pools: dict[str, Any], off: bool) -> dict[str, Any]:
    return without_batching(pools) if off else pools


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {escape(msg)}", highlight=False)
    return typer.Exit(2)


def _need_plots(command: str) -> None:
    """sim, replay and sweep draw PNGs with matplotlib (the ``bench`` extra): say so
    before any simulation runs rather than fail after it."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:  # no origin: a bare directory named so
        err_console.print(
            f"error: tangram bench {command} draws its plots with matplotlib, which is not "
            "installed; install it with: pip install 'tangram-broker[bench]'",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)


def _check_ref(ref: str | None, policies: list[str]) -> None:
    if ref is not None and ref not in policies:
        raise _fail(f"--ref {ref!r} is not one of the policies run ({', '.join(policies)})")


def _check_out(out: Path, option: str = "--out") -> None:
    """``out`` is created when the results are written, after the simulations: a place
    where that cannot succeed is refused now. The nearest existing ancestor must be a
    directory this user can write."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise _fail(f"{option} {out}: {probe} is not a directory this user can write")


def _check_trace_path(path: Path | None) -> None:
    if path is not None and not path.parent.is_dir():
        raise _fail(f"--save-trace {path}: no directory {path.parent}")
    if path is not None and not os.access(path.parent, os.W_OK | os.X_OK):
        raise _fail(f"--save-trace {path}: cannot write in {path.parent}")


def _check_pool(pool: str | None, capacity: int | None) -> None:
    if pool is not None and capacity is None:
        raise _fail("--pool names the pool --capacity resizes; give --capacity too")


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
    return pool if pool is not None else main_pool(pools)


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


def _declared(
    trajs: list[TrajectorySpec], duration_error: float, hide: bool, seed: int
) -> list[TrajectorySpec]:
    """The trajectories with the declarations ``--duration-error``/``--hide-durations``
    ask for (the true durations, hence the workload, unchanged)."""
    if hide and duration_error > 0:
        raise _fail("--hide-durations declares no duration; leave out --duration-error")
    return declare_durations(trajs, duration_error, hide, seed)


def _declared_meta(duration_error: float, hide: bool) -> dict[str, Any]:
    return {"duration_error": duration_error, "hide_durations": hide}


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
    progress: Progress | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each policy over ``trajs``, one progress bar each (in ``progress``, a display
    the caller holds, or one of their own)."""
    results: dict[str, dict[str, Any]] = {}
    series = {}
    total = sum(len(t.actions) for t in trajs)
    with nullcontext(progress) if progress is not None else _progress(quiet) as prog:
        for pol in policies:
            task = prog.add_task(f"{pol:>10}", total=total)

            def tick(n: int, task: Any = task) -> None:
                prog.update(task, completed=n)

            try:
                res, runner = simulate(trajs, pools, pol, seed=seed, check=check, progress=tick)
            except (ValueError, ConfigError, SimulationStuck, TangramError) as exc:
                raise _fail(f"policy {pol}: {exc}") from None
            prog.remove_task(task)
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
    title: str,
) -> dict[str, Any]:
    """Write results.json and the plots; return what results.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**meta, "policies": results}
    report.write_json(out / "results.json", payload)
    report.plot_act_over_time(series, out / "act_over_time.png", title=title)
    report.plot_act_split(results, out / "act_split.png", title=title)
    console.print(f"wrote {out / 'results.json'}, act_over_time.png, act_split.png")
    return payload


@bench_app.command("sim")
@_json_aware
def sim(
    workload: Annotated[str, typer.Option("--workload", "-w", help=WORKLOAD_HELP)] = "coding",
    policy: PolicyOpt = ["tangram"],  # noqa: B006 (typer reads the default, never mutates it)
    config: ConfigOpt = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch", "-b", min=1, help="trajectories per step (default: paper's)"),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", "-s", help="RL steps", min=1)] = 1,
    seed: SeedOpt = 0,
    out: OutOpt = Path("bench-out"),
    save_trace: Annotated[
        Path | None,
        typer.Option("--save-trace", dir_okay=False, help="write the generated workload as JSONL"),
    ] = None,
    ref: Annotated[
        str | None,
        typer.Option("--ref", help="policy the ratios are taken against (default: first)"),
    ] = None,
    capacity: CapacityOpt = None,
    pool: PoolOpt = None,
    check: CheckOpt = False,
    duration_error: DurationErrorOpt = 0.0,
    hide_durations: HideDurationsOpt = False,
    no_batching: NoBatchingOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Generate a workload and run it under each policy; print a table (with the lower
    bounds no policy can beat), write results."""
    _check_workload(workload)
    policies = _check_policies(policy)
    _check_ref(ref, policies)
    _check_pool(pool, capacity)
    if hide_durations and duration_error > 0:
        raise _fail("--hide-durations declares no duration; leave out --duration-error")
    _check_out(out)
    _check_trace_path(save_trace)
    _need_plots("sim")
    pools = _resized(_batching(_pools(config, workload), no_batching), pool, capacity)
    t0 = time.perf_counter()
    trajs = generate(workload, batch, steps, seed)
    if save_trace is not None:
        write_trace(save_trace, trajs)
        console.print(f"wrote trace {save_trace}")
    trajs = _declared(trajs, duration_error, hide_durations, seed)
    bf = busy_fraction(trajs)
    console.print(
        f"workload {workload}: {len(trajs)} trajectories, "
        f"{sum(len(t.actions) for t in trajs)} actions, busy fraction {bf:.2f} at minimum"
    )
    results, series = run_policies(trajs, pools, policies, seed, check)
    title = f"{workload}, batch {batch or WORKLOADS[workload].batch}"
    console.print(report.table(results, title, ref or policies[0]))
    meta = {
        "workload": workload,
        "batch": batch or WORKLOADS[workload].batch,
        "steps": steps,
        "seed": seed,
        "busy_fraction": bf,
        **_declared_meta(duration_error, hide_durations),
        "pools": pools,
    }
    payload = _write(out, meta, results, series, title)
    console.print(f"total wall time {time.perf_counter() - t0:.2f} s")
    if json_out:
        _emit_json(payload)


@bench_app.command("replay")
@_json_aware
def replay(
    trace: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            metavar="TRACE",
            help="JSONL trace (see docs/trace-format.md)",
        ),
    ],
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
    duration_error: DurationErrorOpt = 0.0,
    hide_durations: HideDurationsOpt = False,
    no_batching: NoBatchingOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Replay a recorded trace under each policy; print a table, write results."""
    if workload is not None:
        _check_workload(workload)
    policies = _check_policies(policy)
    _check_ref(ref, policies)
    _check_pool(pool, capacity)
    if hide_durations and duration_error > 0:
        raise _fail("--hide-durations declares no duration; leave out --duration-error")
    _check_out(out)
    _need_plots("replay")
    pools = _resized(_batching(_pools(config, workload), no_batching), pool, capacity)
    t0 = time.perf_counter()
    try:
        trajs = read_trace(trace)
    except (TraceError, OSError) as exc:
        raise _fail(str(exc)) from None
    trajs = _declared(trajs, duration_error, hide_durations, seed)
    bf = busy_fraction(trajs)
    console.print(
        f"trace {trace}: {len(trajs)} trajectories, "
        f"{sum(len(t.actions) for t in trajs)} actions, busy fraction {bf:.2f} at minimum"
    )
    results, series = run_policies(trajs, pools, policies, seed, check)
    title = f"replay {trace.name}"
    console.print(report.table(results, title, ref or policies[0]))
    meta = {
        "trace": str(trace),
        "seed": seed,
        "busy_fraction": bf,
        **_declared_meta(duration_error, hide_durations),
        "pools": pools,
    }
    payload = _write(out, meta, results, series, title)
    console.print(f"total wall time {time.perf_counter() - t0:.2f} s")
    if json_out:
        _emit_json(payload)


@bench_app.command("sweep")
@_json_aware
def sweep(
    workload: Annotated[str, typer.Option("--workload", "-w", help=WORKLOAD_HELP)] = "coding",
    policy: PolicyOpt = ["tangram"],  # noqa: B006
    vary: Annotated[str, typer.Option("--vary", help="batch or capacity")] = "batch",
    values: Annotated[
        str, typer.Option("--values", help="comma-separated batch sizes or unit counts")
    ] = "128,256,512,1024",
    pool: PoolOpt = None,
    capacity: CapacityOpt = None,
    batch: Annotated[
        int | None,
        typer.Option("--batch", "-b", min=1, help="batch when varying capacity"),
    ] = None,
    config: ConfigOpt = None,
    steps: Annotated[int, typer.Option("--steps", "-s", min=1)] = 1,
    seed: SeedOpt = 0,
    out: OutOpt = Path("bench-out"),
    ref: Annotated[
        str | None,
        typer.Option("--ref", help="policy the ratios are taken against (default: first)"),
    ] = None,
    check: CheckOpt = False,
    duration_error: DurationErrorOpt = 0.0,
    hide_durations: HideDurationsOpt = False,
    no_batching: NoBatchingOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Vary batch size or pool capacity; plot mean ACT per policy (the scalability
    figure); end with a table of every point's ACT and step time per policy."""
    _check_workload(workload)
    policies = _check_policies(policy)
    _check_ref(ref, policies)
    ref = ref or policies[0]
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
    if vary == "batch" and batch is not None:
        raise _fail(
            "--batch is the batch when varying capacity; with --vary batch the batches are --values"
        )
    if vary == "batch":
        _check_pool(pool, capacity)
    if hide_durations and duration_error > 0:
        raise _fail("--hide-durations declares no duration; leave out --duration-error")
    _check_out(out)
    _need_plots("sweep")
    pools = _resized(_batching(_pools(config, workload), no_batching), pool, capacity)
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
    fixed_trajs = (
        _declared(generate(workload, batch, steps, seed), duration_error, hide_durations, seed)
        if vary == "capacity"
        else None
    )
    with _progress() as prog:
        overall = prog.add_task(f"{vary} points", total=len(xs))
        for x in xs:
            if vary == "batch":
                trajs = _declared(
                    generate(workload, x, steps, seed), duration_error, hide_durations, seed
                )
                cfg = pools
            else:
                assert fixed_trajs is not None
                trajs, cfg = fixed_trajs, sized[x]
            prog.update(overall, description=f"{vary} = {x}")
            console.print(f"[bold]{vary} = {x}[/bold]")
            results, _ = run_policies(trajs, cfg, policies, seed, check, progress=prog)
            console.print(report.table(results, f"{workload}, {vary} {x}", ref))
            points.append({vary: x, "policies": results})
            for p in policies:
                curves[p].append(results[p]["act_mean_s"])
            prog.advance(overall)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "workload": workload,
        "vary": vary,
        "pool": target if vary == "capacity" else None,
        "batch": batch,
        "steps": steps,
        "seed": seed,
        **_declared_meta(duration_error, hide_durations),
        "pools": pools,
    }
    payload = {**meta, "points": points}
    report.write_json(out / "results.json", payload)
    label = "batch size (trajectories per step)" if vary == "batch" else f"units of pool {target}"
    report.plot_sweep(
        [float(x) for x in xs],
        curves,
        label,
        out / "sweep.png",
        title=f"{workload}: mean ACT by {'batch size' if vary == 'batch' else 'capacity'}",
    )
    console.print(report.sweep_table(vary, points, f"{workload}, sweep over {vary}", ref))
    console.print(f"wrote {out / 'results.json'}, sweep.png")
    console.print(f"total wall time {time.perf_counter() - t0:.2f} s")
    if json_out:
        _emit_json(payload)


def _ints(text: str, option: str, *, default_ok: bool = False, least: int = 1) -> list[int | None]:
    """A comma list of whole numbers >= ``least`` (and ``default``, where allowed: None)."""
    out: list[int | None] = []
    for v in filter(None, (v.strip() for v in text.split(","))):
        if default_ok and v == "default":
            out.append(None)
        elif v.isdigit() and int(v) >= least:
            out.append(int(v))
        else:
            also = " or 'default'" if default_ok else ""
            raise _fail(f"{option} {text!r}: write whole numbers >= {least}{also}, comma-separated")
    return out


@bench_app.command("matrix")
@_json_aware
def matrix_cmd(
    workload: Annotated[
        list[str], typer.Option("--workload", "-w", help=f"repeatable; {WORKLOAD_HELP}")
    ] = ["coding"],  # noqa: B006
    batch: Annotated[
        str,
        typer.Option("--batch", "-b", help="comma list of batch sizes ('default': the paper's)"),
    ] = "default",
    capacity: Annotated[
        str,
        typer.Option(
            "--capacity",
            help="comma list of sizes of each workload's first CPU/GPU pool, in whole nodes "
            "as sim --capacity ('default': the workload's pools)",
        ),
    ] = "default",
    seeds: Annotated[str, typer.Option("--seeds", help="comma list of seeds")] = "0",
    policy: Annotated[
        list[str],
        typer.Option(
            "--policy",
            "-p",
            help="repeatable: the policies compared (the --default one is always run)",
        ),
    ] = [],  # noqa: B006
    fixed_sweep: Annotated[
        bool,
        typer.Option("--fixed-sweep", help="add fixed:2, fixed:4, fixed:8, fixed:16, fixed:32"),
    ] = False,
    default: Annotated[
        str,
        typer.Option("--default", help="the policy judged against paper and every fixed:K"),
    ] = "tangram",
    baseline: Annotated[
        list[str],
        typer.Option("--baseline", help="repeatable: policies only printed (k8s-pod...)"),
    ] = [],  # noqa: B006
    rows: Annotated[
        str | None,
        typer.Option(
            "--rows",
            help="docs/benchmarks.md's rows instead of -w/--batch/--capacity: A-F (11 "
            "distinct coding cases), or some of them (A,C,E)",
        ),
    ] = None,
    preset: Annotated[
        str | None, typer.Option("--preset", help="paper-rows: the same as --rows A-F")
    ] = None,
    steps: Annotated[int, typer.Option("--steps", "-s", min=1)] = 1,
    duration_error: DurationErrorOpt = 0.0,
    hide_durations: HideDurationsOpt = False,
    tolerance: Annotated[
        float,
        typer.Option("--tolerance", min=0.0, callback=_finite, help="relative slack of 'no worse'"),
    ] = matrix.TOLERANCE,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="simulations run in parallel (processes)")
    ] = 2,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="directory for matrix.json")
    ] = Path("bench-out"),
    check: CheckOpt = False,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print only what matrix.json holds, as one JSON document on stdout, "
            "instead of the summary line; tables and messages go to stderr",
        ),
    ] = False,
) -> None:
    """Run a grid of cases (workload x batch x capacity x seed) under every policy and
    print, per case, each policy's ACT / step time, the best fixed K on each metric (in
    hindsight) and the lower bounds. Writes OUT/matrix.json and ends with one JSON line:
    in how many cases the default policy is no worse than min(paper, every fixed:K
    present), and geometric means of default / competitor (below 1: default better)."""
    if hide_durations and duration_error > 0:
        raise _fail("--hide-durations declares no duration; leave out --duration-error")
    seed_list = [s for s in _ints(seeds, "--seeds", least=0) if s is not None] or [0]
    _check_out(out)
    if preset is not None:
        if preset not in matrix.PRESETS:
            raise _fail(f"unknown --preset {preset!r}; choose from {', '.join(matrix.PRESETS)}")
        if rows is not None:
            raise _fail("give --rows or --preset, not both")
        rows = matrix.PRESETS[preset]
    if rows is not None:
        if workload != ["coding"] or batch != "default" or capacity != "default":
            raise _fail(
                "--rows fixes workload, batch and capacity; leave out -w/--batch/--capacity"
            )
        try:
            cases = matrix.row_cases(matrix.parse_rows(rows), seed_list)
        except ValueError as exc:
            raise _fail(str(exc)) from None
    else:
        for w in workload:
            _check_workload(w)
        batches = _ints(batch, "--batch", default_ok=True) or [None]
        capacities = _ints(capacity, "--capacity", default_ok=True) or [None]
        cases = matrix.grid_cases(list(dict.fromkeys(workload)), batches, capacities, seed_list)
    for case in cases:  # every pool size checked before any simulation runs
        try:
            matrix.case_pools(case)
        except ValueError as exc:
            raise _fail(f"{case.workload}, capacity {case.capacity}: {exc}") from None
    compared = list(dict.fromkeys([default, *policy, *(matrix.FIXED_SWEEP if fixed_sweep else ())]))
    extra = [b for b in dict.fromkeys(baseline) if b not in compared]
    _check_policies(compared + extra)
    policies = compared + extra
    settings = matrix.Settings(steps, duration_error, hide_durations, check)
    console.print(
        f"matrix: {len(cases)} cases x {len(policies)} policies = "
        f"{len(cases) * len(policies)} simulations, {jobs} at a time"
    )
    t0 = time.perf_counter()
    done = [0]
    with _progress() as prog:
        task = prog.add_task("cases", total=len(cases))

        def on_case(i: int, entry: dict[str, Any]) -> None:
            done[0] += 1
            prog.advance(task)
            walls = sum(r.get("wall_s", 0.0) for r in entry["policies"].values())
            console.print(
                f"  {entry['case']}: done ({done[0]}/{len(cases)}, {walls:.1f} s of "
                f"simulation, {time.perf_counter() - t0:.0f} s elapsed)"
            )

        entries = matrix.run_matrix(cases, policies, settings, jobs, on_case)
    wall = time.perf_counter() - t0
    summary = matrix.summarise(entries, default, tolerance)
    # Natural width when writing to a file or a pipe: one row per case, never wrapped.
    wide = console if console.is_terminal else Console(width=400, stderr=console.stderr)
    wide.print(matrix.table(entries, policies, default, tolerance, extra))
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "default": default,
        "policies": compared,
        "baselines": extra,
        "seeds": seed_list,
        "steps": steps,
        "rows": rows,
        **_declared_meta(duration_error, hide_durations),
        "tolerance": tolerance,
        "jobs": jobs,
        "wall_s": wall,
    }
    payload = {**meta, "summary": summary, "cases": entries}
    report.write_json(out / "matrix.json", payload)
    console.print(f"wrote {out / 'matrix.json'}; total wall time {wall:.2f} s")
    if json_out:
        _emit_json(payload)
    else:
        typer.echo(json.dumps(summary))


_FIELD = re.compile(r"^\s+(\w+): [^=]+=[^#]*?(?:#\s*(.*))?$")


def _notes(cls: type) -> dict[str, str]:
    """Each field of the dataclass ``cls`` (and of its bases) with the comment that gives
    its source in the code: its own trailing comment, else the last one above it (a
    comment block, or the trailing comment of the field before it)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):  # subclasses' comments win
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        current: list[str] = []
        in_block = False
        for line in lines[1:]:
            text = line.strip()
            if text.startswith("#"):
                current = [*current, text.lstrip("# ")] if in_block else [text.lstrip("# ")]
                in_block = True
                continue
            in_block = False
            m = _FIELD.match(line)
            if m is None:
                if not text or text.startswith(("def ", "@", '"""')):
                    current = []
                continue
            if m.group(2):
                current = [m.group(2).strip()]
            notes[m.group(1)] = " ".join(current)
    return notes


def _source(note: str) -> str:
    """Where a parameter comes from, in a word: the paper, an assumption, or whatever the
    note cites."""
    low = note.lower()
    if "assumed" in low:
        return "assumed"
    if low.startswith("paper") or "paper:" in low or "(paper)" in low:
        return "paper"
    return "see note" if note else ""


def _params() -> list[tuple[str, Any]]:
    return [
        ("coding", CodingParams()),
        ("coding-short", CodingShortParams()),
        ("coding-long", CodingLongParams()),
        ("deepsearch", DeepSearchParams()),
        ("mopd", MopdParams()),
        ("baseline k8s-pod", PodParams()),
        ("baseline static", StaticParams()),
        ("baseline naive-api", NaiveApiParams()),
    ]


MIXED = "mopd and deepsearch, half the batch each, one GPU pool"


@bench_app.command("workloads")
def workloads(
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="print the parameters (with their source and default pools) as one JSON "
            "document instead of the table",
        ),
    ] = False,
) -> None:
    """List the workloads and baselines with their parameters and where each comes from:
    the paper, or "assumed" where the paper is silent (the notes are the comments in
    tangram/sim/workloads.py and tangram/sim/baselines/)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, params in _params():
        notes = _notes(type(params))
        fields = {
            k: {"value": v, "source": _source(notes.get(k, "")), "note": notes.get(k, "")}
            for k, v in dataclasses.asdict(params).items()
        }
        entry: dict[str, Any] = {"parameters": fields}
        if name in WORKLOADS:
            entry["pools"] = list(WORKLOADS[name].pools["pools"])
        rows[name] = entry
    mixed = {"parameters": {}, "pools": list(WORKLOADS["mixed"].pools["pools"]), "note": MIXED}
    rows = {**dict(list(rows.items())[:5]), "mixed": mixed, **dict(list(rows.items())[5:])}
    if json_out:
        typer.echo(report.dumps(rows), nl=False)
        return
    t = Table(title="workloads and baselines (tangram bench -w NAME, -p NAME)")
    for col in ("workload", "parameter", "value", "source", "note"):
        t.add_column(col, overflow="fold")
    for name, entry in rows.items():
        first = True
        if "pools" in entry:
            t.add_row(name, "default pools", ", ".join(entry["pools"]), "", entry.get("note", ""))
            first = False
        for key, f in entry["parameters"].items():
            t.add_row(
                name if first else "",
                key,
                f"{f['value']:g}" if isinstance(f["value"], float) else str(f["value"]),
                f["source"],
                f["note"],
            )
            first = False
        t.add_section()
    console.print(t)
