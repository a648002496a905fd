"""The FastAPI application: the v1 lease endpoints over one live ``Broker``."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from starlette.responses import Response
from starlette.routing import Route

from tangram import wire
from tangram.broker import Broker
from tangram.config import Config, Tenant
from tangram.server import limits, observe, openapi, parse, problems
from tangram.server.models import (
    MAX_NAME,
    ActionIn,
    ActionOut,
    CloseOut,
    HealthOut,
    HeartbeatIn,
    LeaseStateOut,
    PoolsOut,
    ReleaseIn,
)
from tangram.server.openapi import error_responses
from tangram.server.problems import Problem
from tangram.server.registry import Record
from tangram.server.service import Service
from tangram.server.wire import action_json, lease_state_json, respond, to_action
from tangram.spec import QueueFull

Wait = Annotated[
    float,
    Query(
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds to hold the request while the action is queued (long poll); "
        "the server caps it at its max_wait_seconds",
    ),
]
Id = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]
TrajectoryId = Annotated[
    str, Path(min_length=1, max_length=MAX_NAME, description="percent-encode every reserved "
              "character, '/' and '.' included")
]  # fmt: skip


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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.adopt_restored()
        yield
        if svc.owns_broker:
            await svc.broker.close()
        if on_stop is not None:
            on_stop()

    app = FastAPI(
        title="Tangram lease API",
        version="1",
        description="Lease pooled units (CPU cores, GPU chunks, API permits) for single "
        "actions of RL trajectories. Errors are RFC 9457 problem details.",
        lifespan=lifespan,
    )
    app.state.service = svc
    problems.install(app)
    limits.install(app, svc.settings)  # inside observe: its metrics count the 413s
    observe.install(app, svc.broker)
    auth = (401,) if svc.tenants else ()

    @app.post(
        "/v1/actions",
        response_model=ActionOut,
        summary="Submit an action",
        responses={
            200: {"description": "granted (or ended already, for a retried submit)"},
            202: {"model": ActionOut, "description": "queued; poll GET /v1/actions/{id}"},
            **error_responses(*auth, 409, 422, 429, 503),
        },
        openapi_extra={
            "parameters": [parse.WAIT_PARAM, parse.KEY_PARAM],
            "requestBody": parse.body_spec(ActionIn, required=True),
        },
    )
    async def submit(request: Request) -> Response:
        tenant = svc.tenant(request)
        body = await parse.body(request, ActionIn, required=True)
        assert body is not None
        wait = parse.wait(request)
        idempotency_key = parse.idempotency_key(request)
        reg = svc.registry
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = parse.fingerprint(body)
            old = reg.by_key.get((tenant, idempotency_key))
            if old is not None:
                # The validated bodies compare equal whatever the key order or spacing;
                # the journal keeps the fingerprint, so this holds across restarts.
                if old.action.fingerprint != fingerprint:
                    raise Problem(
                        409,
                        f"Idempotency-Key {idempotency_key!r} was used for a different "
                        f"action ({old.action.id}); use a new key for a new action",
                        kind="idempotency-key-reused",
                    )
                return await svc.answer(old, wait, 202, durable=True)
        action = to_action(body, tenant, idempotency_key)
        action.fingerprint = fingerprint
        try:
            fut = svc.broker.submit_nowait(action)  # InvalidAction: 422, nothing queued
        except QueueFull as exc:  # the tenant's bound or a pool's, counted by the core
            after = svc.settings.retry_after_seconds
            raise Problem(429, str(exc), headers={"Retry-After": str(after)}) from None
        key = (tenant, idempotency_key) if idempotency_key is not None else None
        rec = Record(action, tenant, body.trajectory, fut, key)
        reg.add(rec)
        # Durable before acknowledged: the id answered here survives a restart.
        return await svc.answer(rec, wait, 202, durable=True)

    @app.get(
        "/v1/actions/{action_id}",
        response_model=ActionOut,
        summary="An action's state and lease (long poll with ?wait)",
        responses=error_responses(*auth, 404, 422),
    )
    async def get_action(request: Request, action_id: Id, wait: Wait = 0.0) -> Response:
        rec = svc.record(action_id, svc.tenant(request))
        return await svc.answer(rec, wait, 200)

    @app.delete(
        "/v1/actions/{action_id}",
        response_model=ActionOut,
        summary="Cancel a queued action",
        responses=error_responses(*auth, 404, 409, 422, 503),
    )
    async def cancel_action(request: Request, action_id: Id) -> Response:
        rec = svc.record(action_id, svc.tenant(request))
        if rec.state == "queued":
            svc.broker.cancel(action_id)
            svc.registry.settle(rec)
        await svc.broker.sync()  # also for a retry: the first answer may have been a 503
        if rec.state != "cancelled":
            lease = rec.lease.id if rec.lease is not None else "?"
            raise Problem(
                409,
                f"action {action_id!r} is {rec.state} (lease {lease}), not queued; "
                "release the lease instead of cancelling the action",
                kind="not-queued",
            )
        return respond(action_json(rec, svc.wall))

    @app.post(
        "/v1/leases/{lease_id}/heartbeat",
        response_model=LeaseStateOut,
        summary="Extend a lease's TTL",
        responses=error_responses(*auth, 404, 409, 410, 422, 503),
    )
    async def heartbeat(
        request: Request, lease_id: Id, body: HeartbeatIn | None = None
    ) -> Response:
        rec = svc.lease_record(lease_id, svc.tenant(request))
        svc.check_holder(rec, body.fencing_token if body is not None else None)
        svc.broker.heartbeat(lease_id, body.ttl if body is not None else None)
        await svc.broker.sync()  # the new deadline survives a restart
        return respond(lease_state_json(rec, svc.wall))

    @app.post(
        "/v1/leases/{lease_id}/release",
        response_model=LeaseStateOut,
        summary="Release a lease (idempotent)",
        responses=error_responses(*auth, 404, 409, 410, 422, 503),
        openapi_extra={"requestBody": parse.body_spec(ReleaseIn, required=False)},
    )
    async def release(request: Request, lease_id: Id) -> Response:
        rec = svc.lease_record(lease_id, svc.tenant(request))
        body = await parse.body(request, ReleaseIn, required=False)
        outcome, usage = "ok", None
        if body is not None:
            svc.check_holder(rec, body.fencing_token)
            outcome = body.outcome
            if body.usage is not None and body.usage.tokens is not None:
                usage = {"tokens": body.usage.tokens}
        svc.broker.release(lease_id, outcome, usage)  # None when released before: fine
        await svc.broker.sync()  # a release answered 200 never comes back as live
        return respond(lease_state_json(rec, svc.wall))

    @app.post(
        # ":path": a trajectory id may hold "/" (sent percent-encoded, as the clients do).
        "/v1/trajectories/{trajectory_id:path}/close",
        response_model=CloseOut,
        summary="Close a trajectory: free its pinned memory, cancel its queued actions",
        responses=error_responses(*auth, 422, 503),
    )
    async def close_trajectory(request: Request, trajectory_id: TrajectoryId) -> Response:
        tenant = svc.tenant(request)
        n = svc.broker.close_trajectory(wire.namespaced(tenant, trajectory_id))
        await svc.broker.sync()
        return respond({"trajectory": trajectory_id, "cancelled": n})

    @app.get(
        "/v1/pools",
        response_model=PoolsOut,
        summary="Capacity, use, queue length and topology per pool",
        responses=error_responses(*auth),
    )
    async def pools(request: Request) -> Response:
        svc.tenant(request)
        snap = svc.broker.snapshot()
        return respond(
            {
                "policy": snap["policy"],
                "queued": snap["queued"],
                "leases": snap["leases"],
                "pools": snap["pools"],
            }
        )

    @app.get("/healthz", response_model=HealthOut, summary="Liveness")
    async def healthz() -> Response:
        return respond({"status": "ok"})

    @app.get("/readyz", response_model=HealthOut, summary="Readiness")
    async def readyz() -> Response:
        return respond({"status": "ready"})

    async def release_fast(request: Request) -> Response:
        return await release(request, parse.path_id(request, "lease_id"))

    # The two calls of every lease cycle skip FastAPI's routing and parameter machinery
    # (they read their requests in parse.py); the FastAPI routes above stay for the
    # OpenAPI document, and answer the same if reached.
    app.router.routes[:0] = [
        Route("/v1/actions", submit, methods=["POST"]),
        Route("/v1/leases/{lease_id}/release", release_fast, methods=["POST"]),
    ]
    openapi.install(app, bearer=bool(svc.tenants))
    return app
