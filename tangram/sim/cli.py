"""``tangram bench ...`` (placeholder until the benchmark issue lands)."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks: simulate the paper's workloads and baselines.")
