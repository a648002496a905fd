"""Errors as problem+json (RFC 9457): every error the API answers goes through here."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tangram.errors import TYPE_BASE, QueueFull, TangramError, Unavailable, code_of

PROBLEM = "application/problem+json"


class Problem(Exception):
    """An error answer: status, a short title, and a ``detail`` a person can act on."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _KINDS.get(status, "error")
        self.headers = dict(headers or {})

    def response(self, instance: str | None = None) -> Response:
        body: dict[str, Any] = {
            "type": TYPE_BASE + self.kind,
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            body["instance"] = instance
        return Response(orjson.dumps(body), self.status, self.headers, media_type=PROBLEM)


# The types of problems no error class stands for (the HTTP layer's own); an error
# Tangram raises answers with its status and type from tangram.errors.CODES.
_KINDS = {
    400: "bad-request",
    401: "unauthorized",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    410: "lease-expired",
    413: "too-large",
    422: "invalid",
    429: "too-many-queued",
    500: "internal",
    503: "unavailable",
}


def from_tangram(exc: TangramError) -> Problem:
    """The answer to an error the broker raised on purpose: its status and type from the
    one table (tangram/errors.py), and when to retry for those that say."""
    code = code_of(exc)
    headers = None
    if isinstance(exc, (Unavailable, QueueFull)):
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
    return Problem(code.status, str(exc), kind=code.kind, headers=headers)


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in loc) or "request"


def validation_detail(exc: RequestValidationError) -> str:
    """One line per problem, naming the field: ``body.demands.cpu: ...``."""
    parts = []
    for err in exc.errors()[:10]:
        msg = str(err.get("msg", "invalid"))
        parts.append(f"{_where(tuple(err.get('loc', ())))}: {msg}")
    return "; ".join(parts) or "the request does not match the schema at /openapi.json"


def install(app: FastAPI) -> None:
    """Answer every error, the framework's own included, as problem+json."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return exc.response(request.url.path)

    async def on_tangram(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TangramError)
        return from_tangram(exc).response(request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return Problem(422, validation_detail(exc)).response(request.url.path)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        status = exc.status_code
        if status == 404 and detail == "Not Found":
            detail = f"no such endpoint {request.method} {request.url.path}; see /docs"
        if status == 400:
            # FastAPI's answer to a body it cannot decode; malformed JSON it answers with
            # 422 already, so one status covers every unreadable body.
            status, detail = 422, "body: not a JSON document in UTF-8 (" + detail + ")"
        return Problem(status, detail, headers=exc.headers).response(request.url.path)

    async def on_crash(request: Request, exc: Exception) -> Response:
        # A bug, not an input error; it must still answer in the same format.
        return Problem(500, f"internal error ({type(exc).__name__}); this is a bug").response()

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(TangramError, on_tangram)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_crash)
