"""Liveness and readiness: no token needed, nothing in them depends on the config."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from tangram.server.models import HealthOut
from tangram.server.wire import respond

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness", operation_id="liveness")
async def healthz() -> Response:
    return respond({"status": "ok"})


@router.get("/readyz", response_model=HealthOut, summary="Readiness", operation_id="readiness")
async def readyz() -> Response:
    return respond({"status": "ready"})
