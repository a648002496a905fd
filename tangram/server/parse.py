"""Reading the hot endpoints' requests by hand.

FastAPI's parameter machinery costs more per request than the broker's whole lease
cycle, so submit and release are served as plain Starlette routes that read their path,
query, header and body here, with the rules their OpenAPI declarations state and the
same problem answers (the schemathesis test holds them to it).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from tangram.server.models import MAX_NAME
from tangram.server.problems import Problem

M = TypeVar("M", bound=BaseModel)
MAX_WAIT = 3600.0


def _detail(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors()[:10]:
        loc = ".".join(str(x) for x in (where, *err.get("loc", ())))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


async def body(request: Request, model: type[M], *, required: bool) -> M | None:
    """The JSON body as ``model``; None for an empty optional body."""
    raw = await request.body()
    if not raw:
        if required:
            raise Problem(422, "body: Field required")
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise Problem(422, _detail(exc, "body")) from None


def fingerprint(body: BaseModel) -> str:
    """A digest of a validated request: equal for equal requests whatever their key order
    or spacing (the model dumps its fields in declaration order)."""
    return hashlib.blake2b(body.model_dump_json().encode(), digest_size=16).hexdigest()


def wait(request: Request) -> float:
    # Only ``wait`` matters here; Starlette's full query parsing costs more than this.
    raw = None
    for part in request.scope["query_string"].split(b"&"):
        if part.startswith(b"wait="):
            raw = unquote_plus(part[5:].decode("latin-1"))
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise Problem(422, f"query.wait: {raw[:40]!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_WAIT:
        raise Problem(422, f"query.wait: must be between 0 and {MAX_WAIT:g} seconds")
    return value


def path_id(request: Request, name: str) -> str:
    """A path parameter with the bounds of ``tangram.server.routes.common.Id``."""
    value = str(request.path_params[name])
    if not 1 <= len(value) <= MAX_NAME:
        raise Problem(422, f"path.{name}: must be 1 to {MAX_NAME} characters")
    return value


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= MAX_NAME:
        raise Problem(422, f"header.idempotency-key: must be 1 to {MAX_NAME} characters")
    return key


WAIT_PARAM: dict[str, Any] = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "seconds to hold the request while the action is queued (long poll); "
    "the server caps it at its max_wait_seconds",
    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT, "default": 0},
}
KEY_PARAM: dict[str, Any] = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "a retried submit with the same key returns the same action",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_NAME},
}


def body_spec(
    model: type[BaseModel], *, required: bool, examples: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The OpenAPI request body of a model read by hand; ``examples``: name -> an
    OpenAPI Example object (``summary``, ``value``)."""
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
    if examples:
        media["examples"] = examples
    return {"required": required, "content": {"application/json": media}}
