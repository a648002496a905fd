"""The ``tangram`` command: ``tangram serve`` and ``tangram bench ...``."""

from __future__ import annotations

import json

import typer

from tangram.server.cli import serve
from tangram.sim.cli import bench_app

app = typer.Typer(
    help="Tangram: an action-level resource broker for agentic RL.",
    no_args_is_help=True,
    add_completion=False,
)


def live_command(
    trajectories: int = typer.Option(4, min=1, help="concurrent trajectories"),
    steps: int = typer.Option(2, min=1, help="steps (gap + 3 sandbox actions) per trajectory"),
    gap: float = typer.Option(2.0, min=0.0, help="mean generation gap between steps, seconds"),
    seed: int = typer.Option(0, help="seed of the gaps (both modes wait the same gaps)"),
    xdist: bool = typer.Option(True, help="run the pytest suite with -n {dop} (pytest-xdist)"),
    json_only: bool = typer.Option(False, "--json", help="print only the JSON line"),
) -> None:
    """Run a small coding workload for real on this machine (a local Ray cluster, the
    sandbox executor, the pytest suite in tangram/ray/live_suite) under Tangram's
    action-level leases and under a per-trajectory reservation of the same cores; print
    ACT and step time for both, then one line of JSON."""
    # Imported here: the benchmark imports Ray, which every other command can do without.
    from tangram.ray.live import format_report, live

    out = live(trajectories=trajectories, steps=steps, gap=gap, seed=seed, xdist=xdist)
    if not json_only:
        typer.echo(format_report(out))
    typer.echo(json.dumps(out))


app.command("serve")(serve)
# ``bench live`` runs on Ray, a layer above the simulator's other ``bench`` commands.
bench_app.command("live")(live_command)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
