"""The ``tangram`` command: ``tangram serve`` and ``tangram bench ...``."""

from __future__ import annotations

import typer

from tangram.server.cli import serve
from tangram.sim.cli import bench_app

app = typer.Typer(
    help="Tangram: an action-level resource broker for agentic RL.",
    no_args_is_help=True,
    add_completion=False,
)
app.command("serve")(serve)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
