"""``tangram bench matrix``: a grid of simulations, the default policy against ``paper``
and the best fixed degree of parallelism in hindsight.

A *case* is one workload at one batch size, one capacity of its main pool (the first
CPU or GPU pool, resized as ``--capacity`` does) and one seed; every case runs under
every policy. Cases are independent, so they run in a process pool (``--jobs``), one
(case, policy) simulation per task. For each case the table gives every policy's mean
ACT and step time, the best ``fixed:K`` on each (chosen after the fact, per case and per
metric) and the lower bounds (``run.lower_bounds``); ``matrix.json`` keeps every
policy's summary figures; the summary counts the cases where the default policy is no
worse than every competitor present (``paper`` and each ``fixed:K``).

``--rows A-F`` (or ``--preset paper-rows``) is the grid of docs/benchmarks.md's rows A
to F, coding only, without duplicates: A (batch 1280 on the default 15 x 256 cores),
B (256 on 1280), C (1280 on 1280), D (1280 on 768), E (batch 128, 512, 1024, 1536 on
1280 cores: 256 and 1280 are B and C) and F (1024, 1536, 2048 cores at batch 1280: 768
and 1280 are D and C). 11 cases; with ``--seeds 0,1,2``, 33.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from tangram.config import ConfigError
from tangram.sim.engine import SimulationStuck
from tangram.sim.run import declare_durations, main_pool, scale_pool, simulate
from tangram.sim.trace import TrajectorySpec
from tangram.sim.workloads import WORKLOADS, generate
from tangram.spec import TangramError

FIXED_SWEEP = ("fixed:2", "fixed:4", "fixed:8", "fixed:16", "fixed:32")
TOLERANCE = 0.001

# docs/benchmarks.md, "Paper comparison (simulator)", commands A to F: (batch, capacity
# of the CPU pool) per row, None for the workload's default pools (15 x 256 cores).
PAPER_ROWS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "A": ((1280, None),),
    "B": ((256, 1280),),
    "C": ((1280, 1280),),
    "D": ((1280, 768),),
    "E": tuple((b, 1280) for b in (128, 256, 512, 1024, 1280, 1536)),
    "F": tuple((1280, c) for c in (768, 1024, 1280, 1536, 2048)),
}
PRESETS = {"paper-rows": "A-F"}


@dataclass(frozen=True)
class Case:
    label: str  # the row ("A", "E b512") or the grid point ("coding b16 c64")
    workload: str
    batch: int
    capacity: int | None  # units of the workload's main pool; None: its default pools
    seed: int

    @property
    def name(self) -> str:
        return f"{self.label} s{self.seed}"


@dataclass(frozen=True)
class Settings:
    """What every simulation of the matrix shares."""

    steps: int = 1
    duration_error: float = 0.0
    hide_durations: bool = False
    check: bool = False


# ----------------------------------------------------------------------------- the grid


def parse_rows(text: str) -> list[str]:
    """``A-F``, ``A,C,E`` or ``ACE``: the rows, in order, each once."""
    rows: list[str] = []
    for part in filter(None, (p.strip().upper() for p in text.split(","))):
        if len(part) == 3 and part[1] == "-":
            lo, hi = part[0], part[2]
            if lo not in PAPER_ROWS or hi not in PAPER_ROWS or lo > hi:
                raise ValueError(f"--rows {text!r}: write a range of A to F such as A-F")
            rows += [r for r in PAPER_ROWS if lo <= r <= hi]
        elif all(c in PAPER_ROWS for c in part):
            rows += list(part)
        else:
            raise ValueError(f"--rows {text!r}: rows are A to F (A-F, A,C or ACE)")
    if not rows:
        raise ValueError("--rows names no row; write A-F")
    return list(dict.fromkeys(rows))


def row_cases(rows: Iterable[str], seeds: list[int]) -> list[Case]:
    """The coding cases of ``rows``, each distinct (batch, capacity) once (labelled by
    the first row that has it), times ``seeds``."""
    seen: dict[tuple[int, int | None], str] = {}
    for row in rows:
        points = PAPER_ROWS[row]
        for batch, cap in points:
            if (batch, cap) in seen:
                continue
            if len(points) == 1:
                label = row
            elif row == "E":
                label = f"E b{batch}"
            else:
                label = f"F c{cap}"
            seen[(batch, cap)] = label
    return [
        Case(label, "coding", batch, cap, seed)
        for (batch, cap), label in seen.items()
        for seed in seeds
    ]


def grid_cases(
    workloads: list[str], batches: list[int | None], capacities: list[int | None], seeds: list[int]
) -> list[Case]:
    """Every workload x batch x capacity x seed (None: the workload's default)."""
    out = []
    for w in workloads:
        for b in dict.fromkeys(batches):
            batch = b or WORKLOADS[w].batch
            for c in dict.fromkeys(capacities):
                label = f"{w} b{batch}" + (f" c{c}" if c is not None else "")
                out += [Case(label, w, batch, c, s) for s in seeds]
    return out


def case_pools(case: Case) -> dict[str, Any]:
    """The case's pools; ValueError if its capacity cannot be built."""
    pools = WORKLOADS[case.workload].pools
    if case.capacity is None:
        return pools
    return scale_pool(pools, main_pool(pools), case.capacity)


def is_fixed(policy: str) -> bool:
    return policy.startswith("fixed:")


def _k(policy: str) -> int:
    arg = policy.partition(":")[2]
    return int(arg) if arg.isdigit() else 0


# ----------------------------------------------------------------------------- running

_CACHE: dict[tuple[Any, ...], list[TrajectorySpec]] = {}


def _trajectories(case: Case, settings: Settings) -> list[TrajectorySpec]:
    """The case's workload (declarations applied), kept while a worker runs the same
    case under several policies."""
    key = (case.workload, case.batch, case.seed, settings)
    if key not in _CACHE:
        _CACHE.clear()
        trajs = generate(case.workload, case.batch, settings.steps, case.seed)
        _CACHE[key] = declare_durations(
            trajs, settings.duration_error, settings.hide_durations, case.seed
        )
    return _CACHE[key]


def run_one(case: Case, policy: str, settings: Settings) -> dict[str, Any]:
    """One simulation's results (``run.simulate``), or ``{"error": message}``."""
    try:
        res, _ = simulate(
            _trajectories(case, settings),
            case_pools(case),
            policy,
            seed=case.seed,
            check=settings.check,
        )
    except (ValueError, ConfigError, SimulationStuck, TangramError) as exc:
        return {"error": str(exc)}
    return res


def run_matrix(
    cases: list[Case],
    policies: list[str],
    settings: Settings,
    jobs: int = 2,
    on_case: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every case under every policy; one entry per case, in the order of ``cases``.
    ``on_case(index, entry)`` is called as each case completes. ``jobs`` > 1 runs the
    simulations in that many worker processes."""
    results: list[dict[str, dict[str, Any]]] = [{} for _ in cases]
    entries: list[dict[str, Any]] = [{} for _ in cases]

    def collect(i: int, pol: str, res: dict[str, Any]) -> None:
        results[i][pol] = res
        if len(results[i]) == len(policies):
            entries[i] = _entry(cases[i], {p: results[i][p] for p in policies})
            if on_case is not None:
                on_case(i, entries[i])

    if jobs <= 1:
        for i, case in enumerate(cases):
            for pol in policies:
                collect(i, pol, run_one(case, pol, settings))
        _CACHE.clear()
        return entries
    # Spawned workers: a fresh interpreter each, whatever threads the parent holds.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures: dict[Future[dict[str, Any]], tuple[int, str]] = {}
        for i, case in enumerate(cases):
            for pol in policies:
                futures[pool.submit(run_one, case, pol, settings)] = (i, pol)
        for fut in as_completed(futures):
            i, pol = futures[fut]
            collect(i, pol, fut.result())
    return entries


def _entry(case: Case, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in results.values() if "error" not in r]
    bound = ok[0] if ok else {}
    return {
        "case": case.name,
        "label": case.label,
        "workload": case.workload,
        "batch": case.batch,
        "capacity": case.capacity,
        "seed": case.seed,
        "act_lower_bound_s": bound.get("act_lower_bound_s"),
        "step_lower_bound_s": bound.get("step_lower_bound_s"),
        "best_fixed": {
            metric: _best_fixed(results, key)
            for metric, key in (("act", "act_mean_s"), ("step", "step_mean_s"))
        },
        "policies": results,
    }


def _best_fixed(results: dict[str, dict[str, Any]], key: str) -> dict[str, Any] | None:
    """The ``fixed:K`` with the lowest ``key`` (the smallest K on a tie), or None."""
    fixed = sorted((p for p, r in results.items() if is_fixed(p) and "error" not in r), key=_k)
    if not fixed:
        return None
    best = min(fixed, key=lambda p: results[p][key])
    return {"policy": best, "value": results[best][key]}


# ----------------------------------------------------------------------------- summary


def _figure(entry: dict[str, Any], policy: str, key: str) -> float | None:
    r = entry["policies"].get(policy)
    if r is None or "error" in r:
        return None
    return float(r[key])


def _competitors(entry: dict[str, Any], default: str, key: str) -> float | None:
    """min over ``paper`` and every ``fixed:K`` that ran in this case (None: none did)."""
    vals = [
        _figure(entry, p, key)
        for p in entry["policies"]
        if p != default and (p == "paper" or is_fixed(p))
    ]
    known = [v for v in vals if v is not None]
    return min(known) if known else None


def _geomean(pairs: list[tuple[float, float]]) -> float | None:
    logs = [math.log(a / b) for a, b in pairs if a > 0 and b > 0]
    return round(math.exp(sum(logs) / len(logs)), 6) if logs else None


def summarise(
    entries: list[dict[str, Any]], default: str, tolerance: float = TOLERANCE
) -> dict[str, Any]:
    """The final line: how often the default is no worse than ``min(paper, every
    fixed:K)`` (within ``tolerance``, relative), strictly better on ACT, and the geometric
    means of default / competitor (below 1: the default is better). A count is null
    when no case has a competitor; a geomean is left out when its competitor never ran.
    A case whose default run failed counts as worse; one whose competitors all failed,
    as no worse."""
    has_comp = any(
        p != default and (p == "paper" or is_fixed(p)) for e in entries for p in e["policies"]
    )
    counts = {"no_worse_act": 0, "no_worse_step": 0, "no_worse_both": 0, "strictly_better_act": 0}
    vs_paper: dict[str, list[tuple[float, float]]] = {"act": [], "step": []}
    vs_fixed: dict[str, list[tuple[float, float]]] = {"act": [], "step": []}
    paper_ran = False
    fixed_ran = False
    for e in entries:
        ok = {}
        for metric, key in (("act", "act_mean_s"), ("step", "step_mean_s")):
            mine = _figure(e, default, key)
            best = _competitors(e, default, key)
            ok[metric] = mine is not None and (best is None or mine <= best * (1 + tolerance))
            if metric == "act" and mine is not None and (best is None or mine < best):
                counts["strictly_better_act"] += 1
            if default != "paper" and "paper" in e["policies"]:
                paper_ran = True
                theirs = _figure(e, "paper", key)
                if mine is not None and theirs is not None:
                    vs_paper[metric].append((mine, theirs))
            bf = e["best_fixed"][metric]
            if bf is not None:
                fixed_ran = True
                if mine is not None:
                    vs_fixed[metric].append((mine, bf["value"]))
        counts["no_worse_act"] += ok["act"]
        counts["no_worse_step"] += ok["step"]
        counts["no_worse_both"] += ok["act"] and ok["step"]
    out: dict[str, Any] = {"cases": len(entries), "default": default}
    out.update({k: (v if has_comp else None) for k, v in counts.items()})
    if paper_ran:
        out["geomean_act_vs_paper"] = _geomean(vs_paper["act"])
        out["geomean_step_vs_paper"] = _geomean(vs_paper["step"])
    if fixed_ran:
        out["geomean_act_vs_best_fixed"] = _geomean(vs_fixed["act"])
        out["geomean_step_vs_best_fixed"] = _geomean(vs_fixed["step"])
    out["tolerance"] = tolerance
    return out


# ----------------------------------------------------------------------------- table


def _cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return ""
    if "error" in r:
        return "error"
    return f"{r['act_mean_s']:.4g} / {r['step_mean_s']:.4g}"


def table(
    entries: list[dict[str, Any]],
    policies: list[str],
    default: str,
    tolerance: float = TOLERANCE,
    baselines: Iterable[str] = (),
) -> Table:
    """One row per case: each policy's ACT / step (seconds), the default's column
    marked *, the best fixed K on each metric, the lower bounds, and the metrics on which
    the default is no worse than every competitor."""
    base = set(baselines)
    t = Table(title="ACT mean / step time (s) per case; * the default policy")
    t.add_column("case")
    for p in policies:
        head = f"{p} *" if p == default else (f"{p} (baseline)" if p in base else p)
        t.add_column(head, justify="right", style="bold" if p == default else None)
    t.add_column("best fixed ACT", justify="right")
    t.add_column("best fixed step", justify="right")
    t.add_column("lower bound", justify="right")
    t.add_column("* no worse on", justify="center")
    for e in entries:
        cells = [e["case"]] + [_cell(e["policies"].get(p)) for p in policies]
        for metric in ("act", "step"):
            bf = e["best_fixed"][metric]
            cells.append(f"{bf['policy']} {bf['value']:.4g}" if bf else "-")
        lo_act, lo_step = e["act_lower_bound_s"], e["step_lower_bound_s"]
        cells.append(f"{lo_act:.4g} / {lo_step:.4g}" if lo_act is not None else "-")
        one = summarise([e], default, tolerance)
        if one["no_worse_act"] is None:
            cells.append("-")
        else:
            got = [m for m in ("act", "step") if one[f"no_worse_{m}"]]
            cells.append(", ".join("ACT" if m == "act" else "step" for m in got) or "neither")
        t.add_row(*cells)
    return t
