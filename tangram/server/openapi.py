"""The OpenAPI document: error answers as problem+json, bearer auth when tenants exist.

FastAPI documents every response as application/json and knows nothing of the tenant
check (done in the handlers, where it costs less than a dependency); this fixes both so
that /openapi.json describes what the server really answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from tangram.server.models import ActionIn, ProblemOut, ReleaseIn
from tangram.server.problems import PROBLEM

BODIES = (ActionIn, ReleaseIn)
_WHY = {
    401: "no bearer token, or not a tenant's token",
    404: "no such action or lease (or another tenant's)",
    409: "conflict: the action is not queued, the lease was released, or the "
    "Idempotency-Key was used for another action",
    410: "the lease expired; its units were taken back",
    422: "invalid request, or an action that can never be granted",
    429: "too many queued actions for this tenant; retry after Retry-After seconds",
    503: "the broker cannot make changes durable now (its journal cannot write); nothing "
    "was changed; retry after Retry-After seconds",
}


# One tag per concept of docs/http-api.md, in the order /docs lists them.
TAGS: list[dict[str, Any]] = [
    {
        "name": "actions",
        "description": "Submit an action (one external call of a trajectory), read its "
        "state and lease with a long poll, or cancel it while queued. A queued action says "
        "why it waits.",
    },
    {
        "name": "leases",
        "description": "Keep a granted lease alive (heartbeat) and give its units back "
        "(release, idempotent).",
    },
    {
        "name": "trajectories",
        "description": "Close a trajectory: free its pinned node and memory, cancel its "
        "queued actions.",
    },
    {"name": "pools", "description": "Capacity, use, queue length and topology per pool."},
    {"name": "health", "description": "Liveness and readiness; no token needed."},
]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ProblemOut, "description": _WHY[code]} for code in codes}


def install(app: FastAPI, *, bearer: bool) -> None:
    def build() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        # The bodies the hot endpoints read by hand (parse.py) are not known to FastAPI.
        _, defs = models_json_schema(
            [(m, "validation") for m in BODIES], ref_template="#/components/schemas/{model}"
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in defs.get("$defs", {}).items():
            schemas.setdefault(name, schema)
        ref = {"$ref": "#/components/schemas/ProblemOut"}
        for path, ops in doc.get("paths", {}).items():
            for op in ops.values():
                for code, resp in op.get("responses", {}).items():
                    if code.isdigit() and int(code) >= 400:
                        resp["content"] = {PROBLEM: {"schema": ref}}
                    if code == "429":
                        resp["headers"] = {
                            "Retry-After": {
                                "description": "seconds to wait before submitting again",
                                "required": True,
                                "schema": {"type": "integer"},
                            }
                        }
                if bearer and path.startswith("/v1/"):
                    op["security"] = [{"bearer": []}]
        if bearer:
            comps = doc.setdefault("components", {})
            comps.setdefault("securitySchemes", {})["bearer"] = {
                "type": "http",
                "scheme": "bearer",
                "description": "a tenant's token from the server's configuration",
            }
        app.openapi_schema = doc
        return doc

    app.openapi = build  # type: ignore[method-assign]
