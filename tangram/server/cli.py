"""``tangram serve`` (placeholder until the HTTP issue lands)."""

from __future__ import annotations

import typer


def serve() -> None:
    """Start the HTTP broker (not built yet)."""
    typer.echo("tangram serve: the HTTP API is not built yet", err=True)
    raise typer.Exit(1)
