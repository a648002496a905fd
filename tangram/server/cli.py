"""``tangram serve``: the HTTP lease API under uvicorn."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from tangram.config import Config, ConfigError, default_config, load_config

log = logging.getLogger("tangram.server")


def describe(cfg: Config) -> str:
    """Pools in a few words: ``cpu (cpu, 8 cores on 1 node), api (quota, 16 permits at once)``."""
    parts = []
    for name, mgr in cfg.build_pools().items():
        size = mgr.describe()
        parts.append(f"{name} ({mgr.kind}{', ' + size if size else ''})")
    return ", ".join(parts)


def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="pool configuration (YAML); default: embedded defaults"),
    ] = None,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to bind (0: any free port)")] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="directory for the lease journal (leases survive a restart) and "
            "serve.json (address and pid of the running server)",
        ),
    ] = None,
    durability: Annotated[
        str | None,
        typer.Option(
            help="with --data-dir: 'normal' survives a crash of this process, 'full' also "
            "a crash of the machine (an fsync per commit); default: the configuration's",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level")] = "warning",
) -> None:
    """Serve the HTTP lease API (FastAPI under uvicorn) for the configured pools."""
    # Imported here so that `tangram --help` stays fast.
    from tangram.journal import JournalError
    from tangram.server.app import create_app
    from tangram.server.limits import ConnectionLimits, raise_open_file_limit
    from tangram.server.run import bind, is_loopback, url_of, uvicorn_config

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = load_config(config) if config is not None else default_config()
        tenants = cfg.tenants()
        if durability is not None:
            if durability not in ("normal", "full"):
                raise ConfigError(f"--durability must be normal or full, got {durability!r}")
            cfg = cfg.model_copy(update={"durability": durability})
    except (ConfigError, OSError) as exc:
        typer.echo(f"tangram serve: {exc}", err=True)
        raise typer.Exit(2) from None
    if not tenants and not is_loopback(host):
        typer.echo(
            f"tangram serve: refusing to serve on {host} without tenants: anyone who can "
            "reach it could take and release units. Add server.tenants or "
            "server.tokens_file to the configuration, or bind to 127.0.0.1.",
            err=True,
        )
        raise typer.Exit(2)
    try:
        sock = bind(host, port)
    except OSError as exc:
        typer.echo(f"tangram serve: cannot listen on {host}:{port}: {exc}", err=True)
        raise typer.Exit(1) from None
    url = url_of(sock)
    info = data_dir / "serve.json" if data_dir is not None else None

    def forget() -> None:
        if info is not None:
            info.unlink(missing_ok=True)

    try:
        app = create_app(cfg, tenants, data_dir=data_dir, on_stop=forget)
    except JournalError as exc:  # refused now, not at the first grant
        typer.echo(f"tangram serve: {exc}", err=True)
        raise typer.Exit(2) from None
    who = f"{len(tenants)} tenants" if tenants else "no tenants (loopback only)"
    files = raise_open_file_limit()
    limits = ConnectionLimits.plan(cfg.server)
    lowered = (
        f"; max_connections {limits.lowered_from} lowered to {limits.max_connections} "
        f"by the open-file limit ({files}; raise ulimit -n)"
        if limits.lowered_from is not None
        else ""
    )
    log.info(
        "tangram serve: lease API on %s for pools %s; policy %s, lease TTL %gs, %s; "
        "config %s; docs at %s/docs%s",
        url,
        describe(cfg),
        cfg.policy,
        cfg.lease_ttl_seconds,
        who,
        config or "embedded defaults",
        url,
        lowered,
    )
    if info is not None:
        info.parent.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    try:
        server_config = uvicorn_config(app, log_level=log_level, limits=limits)
        uvicorn.Server(server_config).run(sockets=[sock])
    finally:
        sock.close()
        forget()
