"""Reports: the comparison table (rich), results.json, and PNG plots (matplotlib, Agg).

Plots never influence results; they only read what ``run.simulate`` returned.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table


def _pyplot() -> Any:
    """matplotlib, imported when a plot is drawn: it costs ``tangram`` start-up half a
    second (``tangram serve`` too) otherwise."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


COLUMNS = [
    ("act_mean_s", "ACT"),
    ("act_p99_s", "p99"),
    ("queue_mean_s", "queue"),
    ("exec_mean_s", "exec"),
    ("setup_mean_s", "setup"),
    ("step_mean_s", "step"),
    ("failed_actions", "failed"),
    ("quota_violations", "over quota"),
]


def table(results: dict[str, dict[str, Any]], title: str, ref: str | None = None) -> Table:
    """One row per policy; ``x ref`` columns give the ratio to the reference policy. A
    last row gives the lower bounds (``run.lower_bounds``) under ACT and step; a column of
    valid trajectories per hour appears when some policy voided trajectories."""
    t = Table(title=title + " (seconds)")
    t.add_column("policy")
    columns = list(COLUMNS)
    if any(r.get("voided_trajectories") for r in results.values()):
        columns.append(("valid_trajectories_per_hour", "valid traj/h"))
    for _, name in columns:
        t.add_column(name, justify="right")
    if ref is not None:
        t.add_column(f"ACT / {ref} ACT", justify="right")
        t.add_column(f"step / {ref} step", justify="right")
    base = results.get(ref or "")
    for pol, r in results.items():
        cells = [pol]
        for key, _ in columns:
            v = r.get(key, 0)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        if ref is not None and base is not None:
            # How many times slower (>1) or faster (<1) this row is than the reference,
            # the form of the paper's figures ("the baseline's ACT is 4.3x ours").
            cells.append(_ratio(r["act_mean_s"], base["act_mean_s"]))
            cells.append(_ratio(r["step_mean_s"], base["step_mean_s"]))
        t.add_row(*cells)
    bound = next((r for r in results.values() if "act_lower_bound_s" in r), None)
    if bound is not None:
        lb = {"act_mean_s": bound["act_lower_bound_s"], "step_mean_s": bound["step_lower_bound_s"]}
        cells = ["lower bound"] + [f"{lb[k]:.4g}" if k in lb else "" for k, _ in columns]
        if ref is not None and base is not None:
            cells += [_ratio(lb["act_mean_s"], base["act_mean_s"])]
            cells += [_ratio(lb["step_mean_s"], base["step_mean_s"])]
        t.add_row(*cells, style="dim")
    return t


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def sweep_table(vary: str, points: list[dict[str, Any]], title: str, ref: str) -> Table:
    """The end of ``bench sweep``: per point and policy, mean ACT and step time and their
    ratios to the reference policy at that point."""
    t = Table(title=title + " (seconds)")
    t.add_column(vary, justify="right")
    t.add_column("policy")
    for name in ("ACT", "step", f"ACT / {ref} ACT", f"step / {ref} step"):
        t.add_column(name, justify="right")
    for i, point in enumerate(points):
        results = point["policies"]
        base = results.get(ref)
        for j, (pol, r) in enumerate(results.items()):
            cells = [str(point[vary]) if j == 0 else "", pol]
            cells += [f"{r['act_mean_s']:.4g}", f"{r['step_mean_s']:.4g}"]
            if base is not None:
                cells.append(_ratio(r["act_mean_s"], base["act_mean_s"]))
                cells.append(_ratio(r["step_mean_s"], base["step_mean_s"]))
            t.add_row(*cells, end_section=j == len(results) - 1 and i < len(points) - 1)
    return t


def dumps(payload: dict[str, Any]) -> str:
    """The text of results.json (and of ``--json`` on stdout)."""
    return json.dumps(payload, indent=2, sort_keys=False) + "\n"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(dumps(payload))


def plot_act_over_time(
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    path: Path,
    window: float | None = None,
    title: str = "",
) -> Any:
    """Windowed mean ACT over virtual time (actions binned by submission time). Returns
    the figure (closed; its axes can still be read)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    end = max((float(t.max()) for t, _ in series.values() if len(t)), default=1.0)
    w = window or max(end / 60.0, 1e-3)
    for pol, (t, act) in series.items():
        if not len(t):
            continue
        bins = np.floor(t / w).astype(int)
        n = bins.max() + 1
        sums = np.bincount(bins, weights=act, minlength=n)
        counts = np.bincount(bins, minlength=n)
        keep = counts > 0
        ax.plot((np.arange(n)[keep] + 0.5) * w, sums[keep] / counts[keep], label=pol)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel(f"mean ACT over {w:.3g} s windows (s)")
    ax.set_yscale("log")
    ax.set_title(_title("mean action completion time (ACT) over time", title))
    ax.legend(title="policy")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_act_split(results: dict[str, dict[str, Any]], path: Path, title: str = "") -> Any:
    """Mean ACT split into queueing, execution and setup (restore, exec), per policy.
    Returns the figure (closed)."""
    pols = list(results)
    q = np.array([results[p]["queue_mean_s"] for p in pols])
    e = np.array([results[p]["exec_mean_s"] for p in pols])
    o = np.array([results[p]["setup_mean_s"] for p in pols])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(pols) + 2), 4.5))
    x = np.arange(len(pols))
    ax.bar(x, e, label="execution")
    ax.bar(x, q, bottom=e, label="queue")
    ax.bar(x, o, bottom=e + q, label="setup (restore, exec)")
    ax.set_xticks(x, pols, rotation=20)
    ax.set_xlabel("policy")
    ax.set_ylabel("mean ACT (s)")
    ax.set_title(_title("mean ACT split by phase", title))
    ax.legend(title="phase")
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def plot_sweep(
    values: list[float],
    curves: dict[str, list[float]],
    xlabel: str,
    path: Path,
    title: str = "mean ACT by sweep point",
) -> Any:
    """Mean ACT per policy at each point of a sweep. Returns the figure (closed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for pol, ys in curves.items():
        ax.plot(values, ys, marker="o", label=pol)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean ACT (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(title="policy")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _title(what: str, run: str) -> str:
    return f"{run}: {what}" if run else what


def _save(plt: Any, fig: Any, path: Path) -> Any:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
