"""Trajectories: close one (free its pinned memory, cancel its queued actions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from starlette.responses import Response

from tangram import wire
from tangram.server.models import MAX_NAME, CloseOut
from tangram.server.openapi import error_responses
from tangram.server.routes.common import service
from tangram.server.wire import respond

TrajectoryId = Annotated[
    str, Path(min_length=1, max_length=MAX_NAME, description="percent-encode every reserved "
              "character, '/' and '.' included")
]  # fmt: skip


async def close_trajectory(request: Request, trajectory_id: TrajectoryId) -> Response:
    # No docstring: FastAPI would publish it as the operation's description.
    svc = service(request)
    tenant = svc.tenant(request)
    n = svc.broker.close_trajectory(wire.namespaced(tenant, trajectory_id))
    await svc.broker.sync()
    return respond({"trajectory": trajectory_id, "cancelled": n})


def router(auth: tuple[int, ...]) -> APIRouter:
    """``auth``: ``(401,)`` when the server has tenants, so the document lists it."""
    r = APIRouter(tags=["trajectories"])
    r.add_api_route(
        # ":path": a trajectory id may hold "/" (sent percent-encoded, as the clients do).
        "/v1/trajectories/{trajectory_id:path}/close",
        close_trajectory,
        operation_id="closeTrajectory",
        methods=["POST"],
        response_model=CloseOut,
        summary="Close a trajectory: free its pinned memory, cancel its queued actions",
        responses=error_responses(*auth, 422, 503),
    )
    return r
