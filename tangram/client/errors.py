"""Errors of the HTTP client: the server's problem details as Tangram's own errors."""

from __future__ import annotations

from typing import Any

from tangram.spec import InvalidAction, LeaseExpired, LeaseReleased, TangramError, UnknownLease


class HttpError(TangramError):
    """An error answer the client has no more specific error for (401, 409, 429, 5xx)."""

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.problem = problem or {}


class Unauthorized(HttpError):
    """401: no token, or not a tenant's token."""


class TooManyQueued(HttpError):
    """429: this tenant has too many queued actions; ``retry_after`` seconds to wait."""

    def __init__(self, detail: str, problem: dict[str, Any], retry_after: float) -> None:
        super().__init__(429, detail, problem)
        self.retry_after = retry_after


def raise_for(status: int, problem: dict[str, Any], retry_after: float = 1.0) -> None:
    """Raise the error for an error answer's problem details."""
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
    if status == 422:
        raise InvalidAction(detail)
    if status == 404:
        raise UnknownLease(detail)
    if status == 410:
        raise LeaseExpired(detail)
    if status == 409 and kind == "lease-released":
        raise LeaseReleased(detail)
    if status == 401:
        raise Unauthorized(status, detail, problem)
    if status == 429:
        raise TooManyQueued(detail, problem, retry_after)
    raise HttpError(status, detail, problem)
