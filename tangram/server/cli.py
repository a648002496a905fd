"""``tangram serve``: the HTTP lease API under uvicorn.

Every option is checked while the command line is parsed (a usage error, exit status 2,
before anything is printed); the server's packages (the ``server`` extra) are imported
only once the options are known to be good."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import logging
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tangram.config import Config, ConfigError, default_config, load_config

log = logging.getLogger("tangram.server")

# What `tangram serve` imports beyond the base install, and the extra that brings it.
SERVER_MODULES = ("fastapi", "uvicorn", "prometheus_client")
SERVER_EXTRA = "tangram-broker[server]"


class LogLevel(StrEnum):
    """uvicorn's log levels."""

    critical = "critical"
    error = "error"
    warning = "warning"
    info = "info"
    debug = "debug"
    trace = "trace"


class Durability(StrEnum):
    normal = "normal"
    full = "full"


# A label of a host name (RFC 1123; "_" too, as in container service names).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def check_host(value: str) -> str:
    """``--host``: an IP address or a syntactically valid host name (not resolved here:
    a name that does not resolve fails to bind, with its own message)."""
    bare = value.strip("[]") if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(bare)
        return value
    except ValueError:
        pass
    name = value[:-1] if value.endswith(".") else value
    if 0 < len(name) <= 253 and all(_LABEL.fullmatch(p) for p in name.split(".")):
        return value
    raise typer.BadParameter(f"{value!r} is neither an IP address nor a host name")


def installed(module: str) -> bool:
    """Whether ``module`` is installed, without importing it. A bare directory of that
    name on the path (``/tmp/ray``, Ray's session directory, when Python runs in /tmp)
    is a namespace package, not the package: it has no origin."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def missing_server_modules() -> list[str]:
    """The server's packages that are not installed (the base install has none)."""
    return [m for m in SERVER_MODULES if not installed(m)]


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
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            readable=True,
            help="pool configuration (YAML); default: embedded defaults",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(callback=check_host, help="address to bind (IP address or host name)")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="port to bind (0: any free port)")
    ] = 8000,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            file_okay=False,
            help="directory for the lease journal (leases survive a restart) and "
            "serve.json (address and pid of the running server); created if missing",
        ),
    ] = None,
    durability: Annotated[
        Durability | None,
        typer.Option(
            case_sensitive=False,
            help="with --data-dir: 'normal' survives a crash of this process, 'full' also "
            "a crash of the machine (an fsync per commit); default: the configuration's",
        ),
    ] = None,
    log_level: Annotated[
        LogLevel, typer.Option(case_sensitive=False, help="uvicorn's log level")
    ] = LogLevel.warning,
) -> None:
    """Serve the HTTP lease API (FastAPI under uvicorn) for the configured pools."""
    if durability is not None and data_dir is None:
        raise typer.BadParameter(
            "needs --data-dir (without a journal there is nothing to make durable)",
            param_hint="'--durability'",
        )
    missing = missing_server_modules()
    if missing:
        typer.echo(
            f"tangram serve: the HTTP server's packages are not installed ({', '.join(missing)}"
            f"); install them with: pip install '{SERVER_EXTRA}'",
            err=True,
        )
        raise typer.Exit(1)
    # Imported here so that `tangram --help` stays fast and works without the server's
    # packages.
    import uvicorn

    from tangram.journal import JournalError
    from tangram.server.app import create_app
    from tangram.server.limits import ConnectionLimits, raise_open_file_limit
    from tangram.server.run import bind, is_loopback, url_of, uvicorn_config

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        cfg = load_config(config) if config is not None else default_config()
        tenants = cfg.tenants()
        if durability is not None:
            cfg = cfg.model_copy(update={"durability": durability.value})
    except (ConfigError, OSError, UnicodeDecodeError) as exc:
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
    except (OSError, OverflowError) as exc:
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
        server_config = uvicorn_config(app, log_level=log_level.value, limits=limits)
        uvicorn.Server(server_config).run(sockets=[sock])
    finally:
        sock.close()
        forget()
