"""Pools: capacity, use, queue length and topology, from the broker's snapshot."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from tangram.server.models import PoolsOut
from tangram.server.openapi import error_responses
from tangram.server.routes.common import service
from tangram.server.wire import respond


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
    return r
