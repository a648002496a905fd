"""The OpenAI-compatible gateway's endpoints: ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models`` (tangram/server/gateway.py does the work).

Plain Starlette routes, out of the OpenAPI document (which describes the lease API):
their bodies are OpenAI's, forwarded unchanged (only ``model`` and the token limit are
looked at). Errors are answered in OpenAI's shape, not as problem details."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tangram.errors import TangramError
from tangram.server.gateway import JSON, Call, Gateway, openai_error, tangram_error
from tangram.server.observe import TemplateRoute
from tangram.server.problems import Problem
from tangram.server.routes.common import service


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _forward(request: Request, path: str) -> Response:
    gw = gateway(request)
    svc = service(request)
    try:
        tenant = svc.tenant(request)
    except Problem as exc:
        return openai_error(exc.status, exc.detail, headers=exc.headers)
    raw = await request.body()
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return openai_error(400, f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return openai_error(400, "the body must be a JSON object")
    model = body.get("model")
    m = gw.models.get(model) if isinstance(model, str) else None
    if m is None or not isinstance(model, str):
        served = ", ".join(sorted(gw.models)) or "none"
        return openai_error(
            404,
            f"The model {model!r} does not exist on this gateway (served: {served}); "
            "GET /v1/models lists them",
            param="model",
        )
    try:
        action = gw.action(model, m, body, len(raw), request.scope, tenant)
    except TangramError as exc:
        status, message, headers = tangram_error(exc, svc.settings.retry_after_seconds)
        return openai_error(status, message, headers=headers)
    ctx = svc.broker.lease(action, timeout=gw.cfg.queue_timeout_seconds)
    return Call(gw, ctx, m.upstream + path, raw, m)


async def chat_completions(request: Request) -> Response:
    return await _forward(request, "/chat/completions")


async def completions(request: Request) -> Response:
    return await _forward(request, "/completions")


async def models(request: Request) -> Response:
    gw = gateway(request)
    try:
        service(request).tenant(request)
    except Problem as exc:
        return openai_error(exc.status, exc.detail, headers=exc.headers)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "tangram", "pool": m.pool}
        for name, m in gw.models.items()
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)


ROUTES = [
    TemplateRoute(
        "/v1/chat/completions", chat_completions, methods=["POST"], include_in_schema=False
    ),
    TemplateRoute("/v1/completions", completions, methods=["POST"], include_in_schema=False),
    TemplateRoute("/v1/models", models, methods=["GET"], include_in_schema=False),
]
