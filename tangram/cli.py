"""The ``tangram`` command: ``serve``, ``status``, ``config check|schema``, ``bench ...``.

Every option is checked while the command line is parsed: a bad value is a usage error
(exit status 2, the message on stderr, no traceback, nothing printed before it). The
commands import what they need when they run, so ``tangram --help`` stays fast and every
command but ``serve`` and ``bench live`` works on the base install (no server, no Ray).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from tangram.server.cli import installed, serve
from tangram.sim.cli import bench_app

DISTRIBUTION = "tangram-broker"
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Tangram: an action-level resource broker for agentic RL.",
    no_args_is_help=True,
    add_completion=False,
    context_settings=HELP,
)
config_app = typer.Typer(
    help="Check a pool configuration file, or print the JSON Schema of the format.",
    no_args_is_help=True,
    context_settings=HELP,
)


def version() -> str:
    """The installed distribution's version (the package's own from a source tree)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        from tangram import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{DISTRIBUTION} {version()}")
        raise typer.Exit()


@app.callback()
def root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Tangram: an action-level resource broker for agentic RL."""


# ---------------------------------------------------------------- option checks


def finite(value: float | None) -> float | None:
    """An option callback: refuses ``nan`` and ``inf``, which every float option parses."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def check_url(value: str) -> str:
    """``--url``: an http(s) URL with a host, such as http://127.0.0.1:8000."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port  # a port out of range or not a number raises here
    except ValueError as exc:
        raise typer.BadParameter(f"{value!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise typer.BadParameter(f"{value!r} is not an http(s) URL such as http://127.0.0.1:8000")
    del port
    return value.rstrip("/")


# ---------------------------------------------------------------- bench live


def live_command(
    trajectories: int = typer.Option(4, min=1, help="concurrent trajectories"),
    steps: int = typer.Option(2, min=1, help="steps (gap + 3 sandbox actions) per trajectory"),
    gap: float = typer.Option(
        2.0, min=0.0, callback=finite, help="mean generation gap between steps, seconds"
    ),
    seed: int = typer.Option(0, min=0, help="seed of the gaps (both modes wait the same gaps)"),
    xdist: bool = typer.Option(True, help="run the pytest suite with -n {dop} (pytest-xdist)"),
    sandbox: str = typer.Option(
        "bubblewrap",
        help="the sandbox backend: bubblewrap, or container (a runc container per "
        "trajectory from --image; docs/sandboxes.md)",
    ),
    image: str | None = typer.Option(
        None,
        help="the container backend's image (oci:DIR:TAG, docker-archive:FILE, ...); "
        "its python needs pytest and pytest-xdist (make sandbox-image builds one)",
    ),
    json_only: bool = typer.Option(False, "--json", help="print only the JSON line"),
) -> None:
    """Run a small coding workload for real on this machine (a local Ray cluster, the
    sandbox executor, the pytest suite in tangram/ray/live_suite) under Tangram's
    action-level leases and under a per-trajectory reservation of the same cores; print
    ACT and step time for both, then one line of JSON."""
    if sandbox not in ("bubblewrap", "container"):
        raise typer.BadParameter(
            f"{sandbox!r}: give bubblewrap or container", param_hint="'--sandbox'"
        )
    if (sandbox == "container") != (image is not None):
        raise typer.BadParameter(
            "the container backend needs --image, and only it takes one",
            param_hint="'--image'",
        )
    missing = [m for m in ("ray", "pytest") if not installed(m)]
    if missing:
        typer.echo(
            f"tangram bench live: needs {' and '.join(missing)}, not installed; install "
            f"them with: pip install '{DISTRIBUTION}[ray,bench]'",
            err=True,
        )
        raise typer.Exit(1)
    # Imported here: the benchmark imports Ray, which every other command can do without.
    from tangram.ray.live import format_report, live

    box = {"backend": sandbox, "image": image} if image else None
    out = live(trajectories=trajectories, steps=steps, gap=gap, seed=seed, xdist=xdist, sandbox=box)
    if not json_only:
        typer.echo(format_report(out))
    typer.echo(json.dumps(out))


# ---------------------------------------------------------------- config


@config_app.command("check")
def config_check(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True,
            dir_okay=False,
            readable=True,
            metavar="FILE",
            help="pool configuration (YAML)",
        ),
    ],
) -> None:
    """Load a configuration as `tangram serve --config FILE` would, build its pools and
    print a summary; exit status 2 with the error on stderr when it is not valid."""
    from tangram.config import ConfigError, load_config

    try:
        cfg = load_config(file)
        pools = cfg.build_pools()
        tokens = _tokens_path(cfg)
        tenants = cfg.tenants() if tokens is None or tokens.exists() else None
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
        msg = str(exc)
        where = "" if msg.startswith(str(file)) else f"{file}: "
        typer.echo(f"tangram config check: {where}{msg}", err=True)
        raise typer.Exit(2) from None
    lines = [
        f"{file}: valid",
        f"policy {cfg.policy}, lease TTL {cfg.lease_ttl_seconds:g}s, at most "
        f"{cfg.max_queued_per_pool:,} queued per pool, durability {cfg.durability}",
        f"pools ({len(pools)}):",
    ]
    width = max(len(n) for n in pools)
    for name, mgr in pools.items():
        size = mgr.describe()
        lines.append(f"  {name:<{width}}  {mgr.kind:<5}  {size}".rstrip())
    server = cfg.server
    if tenants is None:
        who = f"tenants in {tokens} (not on this machine: not checked)"
    elif tenants:
        who = f"{len(tenants)} tenants"
    else:
        who = "no tenants (tangram serve binds loopback addresses only)"
    lines.append(
        f"server: {who}; long polls up to {server.max_wait_seconds:g}s, at most "
        f"{server.max_connections:,} connections"
    )
    typer.echo("\n".join(lines))
    if tenants is None:
        typer.echo(
            f"tangram config check: warning: server.tokens_file {tokens} does not exist "
            "here; tangram serve refuses to start until it does",
            err=True,
        )


def _tokens_path(cfg: Any) -> Path | None:
    """Where ``server.tokens_file`` points (relative to the configuration file)."""
    name = cfg.server.tokens_file
    if name is None:
        return None
    path = Path(name)
    if not path.is_absolute() and cfg.source is not None:
        path = cfg.source.parent / path
    return path


def config_schema_document() -> dict[str, Any]:
    """The JSON Schema of the configuration file, from its pydantic model (with every
    registered kind of pool)."""
    from tangram.config import Config

    schema = Config.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "title": "Tangram pool configuration",
        "description": "The file of tangram serve --config and Broker.from_config "
        "(docs/configuration.md).",
    }


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the configuration file, for editors (for example the YAML
    language server: `# yaml-language-server: $schema=tangram.schema.json`)."""
    typer.echo(json.dumps(config_schema_document(), indent=2))


# ---------------------------------------------------------------- status


def status(
    url: Annotated[
        str,
        typer.Option(
            "--url",
            envvar="TANGRAM_URL",
            callback=check_url,
            help="the broker's HTTP address",
        ),
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="TANGRAM_TOKEN",
            help="a tenant's bearer token (when the server has tenants)",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, callback=finite, help="seconds to wait")
    ] = 5.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the server's answer (GET /v1/status) as JSON")
    ] = False,
) -> None:
    """Show a running broker: per pool its units in use, queue and nodes; the queue per
    tenant, the oldest waiting actions and why they wait, the leases held by age
    (GET /v1/status)."""
    import httpx

    from tangram.client import HttpClient, HttpError, Unauthorized
    from tangram.spec import TangramError

    async def fetch() -> dict[str, Any]:
        async with HttpClient(url, token=token, timeout=timeout, retries=0) as client:
            return await client.status()

    def fail(msg: str) -> typer.Exit:
        typer.echo(f"tangram status: {msg}", err=True)
        return typer.Exit(1)

    try:
        doc = asyncio.run(fetch())
    except Unauthorized as exc:
        hint = "a token the server knows" if token else "--token or TANGRAM_TOKEN"
        raise fail(f"{url} refused the request ({exc}); give {hint}") from None
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    except (HttpError, TangramError) as exc:  # BrokerUnreachable names the URL itself
        raise fail(str(exc) if url in str(exc) else f"{url}: {exc}") from None
    if not _looks_like_pools(doc):
        raise fail(f"{url} does not answer GET /v1/status like a Tangram broker")
    typer.echo(json.dumps(doc, indent=2) if as_json else format_status(url, doc))


def _looks_like_pools(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and isinstance(doc.get("pools"), dict)
        and all(
            isinstance(p, dict) and {"kind", "capacity", "in_use", "queued"} <= p.keys()
            for p in doc["pools"].values()
        )
    )


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def format_status(url: str, doc: dict[str, Any]) -> str:
    """The ``GET /v1/pools`` answer as a table: one row per pool (units in use of
    capacity, queued actions, busy share of unit time since start), one per node."""
    leases = int(doc.get("leases", 0))
    queued = int(doc.get("queued", 0))
    head = [
        f"Tangram broker at {url}",
        f"policy {doc.get('policy', '?')}: {_plural(leases, 'lease')} held, "
        f"{_plural(queued, 'action')} queued",
        "",
    ]
    rows = [("pool", "kind", "in use", "queued", "busy since start")]
    for name, pool in doc["pools"].items():
        cap, used = int(pool["capacity"]), int(pool["in_use"])
        share = f" ({100 * used / cap:.0f}%)" if cap > 0 else ""
        busy = pool.get("busy_unit_seconds")
        idle = pool.get("idle_unit_seconds")
        since = (
            f"{100 * busy / (busy + idle):.0f}%"
            if isinstance(busy, int | float) and isinstance(idle, int | float) and busy + idle > 0
            else "-"
        )
        rows.append((name, str(pool["kind"]), f"{used}/{cap}{share}", str(pool["queued"]), since))
        nodes = pool.get("nodes") or {}
        if len(nodes) > 1 or any(n for n in nodes):
            for node, use in nodes.items():
                rows.append(
                    (
                        f"  {node}",
                        "",
                        f"{use.get('in_use', '?')}/{use.get('capacity', '?')}",
                        "",
                        "",
                    )
                )
    return "\n".join(head + _table(rows) + _details(doc))


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _details(doc: dict[str, Any]) -> list[str]:
    """The queue per tenant, the oldest waiters and why, the leases by age (present in
    ``GET /v1/status``; an older broker answering only ``/v1/pools`` has none)."""
    out: list[str] = []
    by_tenant = doc.get("queued_by_tenant") or {}
    if any(len(t) > 1 or any(t) for t in by_tenant.values()):
        out += ["", "queued per tenant"]
        out += _table(
            [("pool", "tenant", "queued")]
            + [
                (pool, tenant or "-", str(n))
                for pool, tenants in sorted(by_tenant.items())
                for tenant, n in sorted(tenants.items())
            ]
        )
    waiting = doc.get("oldest_waiting") or []
    if waiting:
        out += ["", "oldest waiting"]
        for w in waiting:
            who = f"{w['trajectory']}" + (f" (tenant {w['tenant']})" if w.get("tenant") else "")
            out.append(
                f"  {w['action']}  {who}  {','.join(w['pools'])}  "
                f"waiting {_age(w['waited_seconds'])}: {w.get('message') or w.get('reason')}"
            )
    ages = doc.get("leases_by_age")
    if ages and any(ages.values()):
        out += ["", "leases by age: " + ", ".join(f"{k} {v}" for k, v in ages.items())]
        for h in doc.get("oldest_leases") or []:
            units = ", ".join(f"{p} {n}" for p, n in h["pools"].items())
            out.append(
                f"  {h['action']}  {h['trajectory']}  {units}  held {_age(h['age_seconds'])}"
            )
    return out


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------- the command tree

app.command("serve")(serve)
app.command("status")(status)
app.add_typer(config_app, name="config")
# ``bench live`` runs on Ray, a layer above the simulator's other ``bench`` commands.
bench_app.command("live")(live_command)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
