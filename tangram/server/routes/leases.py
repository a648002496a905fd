"""Leases: heartbeat and release, both checking the caller's fencing token."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tangram.server import parse
from tangram.server.models import HeartbeatIn, LeaseStateOut, ReleaseIn
from tangram.server.openapi import error_responses
from tangram.server.routes.common import Id, service
from tangram.server.wire import lease_state_json, respond

# No docstrings on the handlers: FastAPI would publish them as descriptions.


async def heartbeat(request: Request, lease_id: Id, body: HeartbeatIn | None = None) -> Response:
    svc = service(request)
    rec = svc.lease_record(lease_id, svc.tenant(request))
    svc.check_holder(rec, body.fencing_token if body is not None else None)
    svc.broker.heartbeat(lease_id, body.ttl if body is not None else None)
    await svc.broker.sync()  # the new deadline survives a restart
    return respond(lease_state_json(rec, svc.wall))


async def release(request: Request, lease_id: Id) -> Response:
    svc = service(request)
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


async def release_fast(request: Request) -> Response:
    # ``release`` as a plain Starlette route (create_app): the path id read by hand.
    return await release(request, parse.path_id(request, "lease_id"))


def router(auth: tuple[int, ...]) -> APIRouter:
    """``auth``: ``(401,)`` when the server has tenants, so the document lists it."""
    r = APIRouter(tags=["leases"])
    r.add_api_route(
        "/v1/leases/{lease_id}/heartbeat",
        heartbeat,
        operation_id="heartbeatLease",
        methods=["POST"],
        response_model=LeaseStateOut,
        summary="Extend a lease's TTL",
        responses=error_responses(*auth, 404, 409, 410, 422, 503),
    )
    r.add_api_route(
        "/v1/leases/{lease_id}/release",
        release,
        operation_id="releaseLease",
        methods=["POST"],
        response_model=LeaseStateOut,
        summary="Release a lease (idempotent)",
        responses=error_responses(*auth, 404, 409, 410, 422, 503),
        # The body is read by hand (parse.py), so declared here for the document.
        openapi_extra={"requestBody": parse.body_spec(ReleaseIn, required=False)},
    )
    return r
