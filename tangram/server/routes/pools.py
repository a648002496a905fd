"""Pools: capacity, use, queue length and topology, from the broker's snapshot."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from starlette.responses import Response

from tangram.server.models import PoolsOut, StatusOut
from tangram.server.openapi import error_responses
from tangram.server.routes.common import service
from tangram.server.wire import respond
from tangram.spec import Action
from tangram.wire import local_trajectory


async def pools(request: Request) -> Response:
    # No docstring: FastAPI would publish it as the operation's description.
    svc = service(request)
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


async def status(request: Request) -> Response:
    svc = service(request)
    tenant = svc.tenant(request)
    # With tenants, a tenant sees every count but lists only its own actions: action ids
    # and trajectory names are its business.
    visible = _mine(tenant) if svc.tenants else None
    view = svc.broker.overview(visible)
    for item in (*view["oldest_waiting"], *view["oldest_leases"]):
        item["trajectory"] = local_trajectory(item["tenant"], item["trajectory"])
    return respond(view)


def _mine(tenant: str | None) -> Callable[[Action], bool]:
    return lambda a: a.tenant == tenant


def router(auth: tuple[int, ...]) -> APIRouter:
    """``auth``: ``(401,)`` when the server has tenants, so the document lists it."""
    r = APIRouter(tags=["pools"])
    r.add_api_route(
        "/v1/pools",
        pools,
        operation_id="getPools",
        methods=["GET"],
        response_model=PoolsOut,
        summary="Capacity, use, queue length and topology per pool",
        responses=error_responses(*auth),
    )
    r.add_api_route(
        "/v1/status",
        status,
        operation_id="getStatus",
        methods=["GET"],
        response_model=StatusOut,
        summary="Pools, queue per tenant, the oldest waiters and why they wait, leases by age",
        responses=error_responses(*auth),
    )
    return r
