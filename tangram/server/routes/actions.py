"""Actions: submit, read with a long poll, cancel while queued."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from tangram.server import parse
from tangram.server.models import ActionIn, ActionOut
from tangram.server.openapi import error_responses
from tangram.server.problems import Problem
from tangram.server.registry import Record
from tangram.server.routes.common import Id, service
from tangram.server.wire import action_json, respond, to_action
from tangram.spec import InvalidAction, QueueFull, Unavailable

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

# The handlers have no docstrings on purpose: FastAPI would put them in the OpenAPI
# document as descriptions.


# Why the HTTP layer refused a submit, by the answer's status (the core counts the
# refusals it makes itself: invalid actions and full queues).
REFUSALS = {401: "unauthorized", 409: "idempotency_key_reused", 422: "malformed"}


async def submit(request: Request) -> Response:
    svc = service(request)
    tenant = None
    try:
        tenant = svc.tenant(request)
        body = await parse.body(request, ActionIn, required=True)
        assert body is not None
        wait = parse.wait(request)
        idempotency_key = parse.idempotency_key(request)
        fingerprint = None
        if idempotency_key is not None:
            fingerprint = parse.fingerprint(body)
            old = svc.registry.by_key.get((tenant, idempotency_key))
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
    except Problem as exc:
        reason = REFUSALS.get(exc.status)
        if reason is not None:
            svc.refuse(reason, tenant)
        raise
    except InvalidAction as exc:
        svc.refuse(exc.reason, tenant)
        raise
    action.fingerprint = fingerprint
    try:
        fut = svc.broker.submit_nowait(action)  # InvalidAction: 422, nothing queued
    except QueueFull as exc:  # the tenant's bound or a pool's, counted by the core
        after = svc.settings.retry_after_seconds
        raise Problem(429, str(exc), headers={"Retry-After": str(after)}) from None
    except Unavailable:  # the journal cannot write: refused before the core saw it
        svc.refuse("unavailable", tenant)
        raise
    key = (tenant, idempotency_key) if idempotency_key is not None else None
    rec = Record(action, tenant, body.trajectory, fut, key)
    svc.registry.add(rec)
    # Durable before acknowledged: the id answered here survives a restart. Answered
    # once the round this submit kicked has run: granted (200) when units were free.
    return await svc.answer(rec, wait, 202, durable=True, fresh=True)


async def get_action(request: Request, action_id: Id, wait: Wait = 0.0) -> Response:
    svc = service(request)
    rec = svc.record(action_id, svc.tenant(request))
    return await svc.answer(rec, wait, 200)


async def cancel_action(request: Request, action_id: Id) -> Response:
    svc = service(request)
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


# Example bodies of a submit, for the OpenAPI document (and /docs's "Try it out").
SUBMIT_EXAMPLES: dict[str, Any] = {
    "elastic": {
        "summary": "an elastic sandbox call: 1 to 16 cores and one API permit",
        "value": {
            "trajectory": "traj-7",
            "task": "swe",
            "demands": {"cpu": {"min": 1, "max": 16}, "api": 1},
            "key": "cpu",
            "duration": 8.0,
            "efficiency": {"amdahl": 0.9},
            "memory_gb": 4,
            "tokens": 3000,
            "ttl": 30,
        },
    },
    "fixed": {
        "summary": "one API permit",
        "value": {"trajectory": "traj-7", "demands": {"api": 1}},
    },
}


def router(auth: tuple[int, ...]) -> APIRouter:
    """``auth``: ``(401,)`` when the server has tenants, so the document lists it."""
    r = APIRouter(tags=["actions"])
    r.add_api_route(
        "/v1/actions",
        submit,
        operation_id="submitAction",
        methods=["POST"],
        response_model=ActionOut,
        summary="Submit an action",
        responses={
            200: {
                "description": "granted by the scheduling round the submit triggered (or "
                "during the long poll; or ended already, for a retried submit)"
            },
            202: {
                "model": ActionOut,
                "description": "queued after that round (and the long poll); poll "
                "GET /v1/actions/{id}",
            },
            **error_responses(*auth, 409, 422, 429, 503),
        },
        # Read by hand (parse.py), so declared here for the document.
        openapi_extra={
            "parameters": [parse.WAIT_PARAM, parse.KEY_PARAM],
            "requestBody": parse.body_spec(ActionIn, required=True, examples=SUBMIT_EXAMPLES),
        },
    )
    r.add_api_route(
        "/v1/actions/{action_id}",
        get_action,
        operation_id="getAction",
        methods=["GET"],
        response_model=ActionOut,
        summary="An action's state and lease (long poll with ?wait)",
        responses=error_responses(*auth, 404, 422),
    )
    r.add_api_route(
        "/v1/actions/{action_id}",
        cancel_action,
        operation_id="cancelAction",
        methods=["DELETE"],
        response_model=ActionOut,
        summary="Cancel a queued action",
        responses=error_responses(*auth, 404, 409, 422, 503),
    )
    return r
