"""The FastAPI application: the v1 lease endpoints over one live ``Broker``.

The endpoints are in ``tangram.server.routes``; this builds the state they share (a
``Service``, on ``app.state``) and puts middleware, error handlers and routes together."""

from __future__ import annotations

import inspect
import pathlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from tangram.broker import Broker
from tangram.config import Config, Tenant
from tangram.server import limits, observe, openapi, problems
from tangram.server.gateway import Gateway
from tangram.server.routes import actions, docs, gateway, health, leases, pools, trajectories
from tangram.server.service import Service


def create_app(
    cfg: Config,
    tenants: Mapping[str, Tenant] | None = None,
    *,
    broker: Broker | None = None,
    data_dir: pathlib.Path | None = None,
    on_stop: Callable[[], None] | None = None,
) -> FastAPI:
    """The app for ``cfg``; ``tenants`` defaults to the configuration's own. ``broker``
    serves an existing broker (shared with another door, e.g. a Ray actor; it must run
    on the server's event loop and is not closed at shutdown); by default the app builds
    its own from ``cfg``, journalling its leases under ``data_dir`` when given (and
    restoring those of a previous process). ``on_stop`` runs at shutdown (uvicorn
    re-raises SIGTERM after it, so code after ``run`` never does)."""
    svc = Service(cfg, cfg.tenants() if tenants is None else tenants, broker, data_dir)
    gw = Gateway(cfg.gateway, svc)
    app = FastAPI(
        title="Tangram lease API",
        version="1",
        description="Lease pooled units (CPU cores, GPU chunks, API permits) for single "
        "actions of RL trajectories. Errors are RFC 9457 problem details.",
        openapi_tags=openapi.TAGS,
        lifespan=_lifespan(svc, gw, on_stop),
        # Served from bundled files by routes/docs.py: FastAPI's pages load from a CDN.
        docs_url=None,
        redoc_url=None,
        **_NO_TELEMETRY,
    )
    app.state.service = svc
    app.state.gateway = gw
    problems.install(app)
    # Inside observe: its metrics count the 413s (and a submit's among the refusals).
    limits.install(app, svc.settings, too_large=svc.too_large)
    observe.install(app, svc.broker)
    auth = (401,) if svc.tenants else ()
    app.include_router(actions.router(auth))
    app.include_router(leases.router(auth))
    app.include_router(trajectories.router(auth))
    app.include_router(pools.router(auth))
    app.include_router(health.router)
    docs.install(app)
    # The two calls of every lease cycle skip FastAPI's routing and parameter machinery
    # (they read their requests in parse.py); the FastAPI routes above stay for the
    # OpenAPI document, and answer the same if reached.
    app.router.routes[:0] = [
        observe.TemplateRoute("/v1/actions", actions.submit, methods=["POST"]),
        observe.TemplateRoute(
            "/v1/leases/{lease_id}/release", leases.release_fast, methods=["POST"]
        ),
        # The OpenAI-compatible gateway (docs/http-api.md): plain routes, out of the
        # document, matched early since every forwarded call passes here.
        *gateway.ROUTES,
    ]
    openapi.install(app, bearer=bool(svc.tenants))
    return app


# FastAPI's native OpenTelemetry (0.165 and later) asks the global providers whether
# they are configured on every request (three environment lookups; about 4% of the
# server's time in a lease cycle, profiled). The server has its own metrics
# (observe.py), so it is off where FastAPI has it.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def _lifespan(
    svc: Service, gw: Gateway, on_stop: Callable[[], None] | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.adopt_restored()
        yield
        await gw.aclose()
        if svc.owns_broker:
            await svc.broker.close()
        if on_stop is not None:
            on_stop()

    return lifespan
