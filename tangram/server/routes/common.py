"""What the route modules share: the app's ``Service`` and the bounds of path ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Request

from tangram.server.models import MAX_NAME
from tangram.server.service import Service

Id = Annotated[str, Path(min_length=1, max_length=MAX_NAME)]


def service(request: Request) -> Service:
    # A plain call, not a FastAPI dependency: the hot routes skip FastAPI's machinery
    # (see create_app), and a dependency would cost every other request too.
    svc: Service = request.app.state.service
    return svc
