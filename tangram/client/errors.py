"""Errors of the HTTP client: the server's problem details as Tangram's own errors.

A problem whose ``type`` names an error class of tangram/errors.py's table is raised as
that class (an unknown action as ``UnknownAction``, an unknown lease as
``UnknownLease``); the two that say when to try again are raised as subclasses that are
also ``HttpError`` (``TooManyQueued``, ``ServerUnavailable``), as they always were. A 404
that names neither (no such endpoint: a wrong base URL, or not a Tangram server at all)
is an ``HttpError`` whose message names the URL. A server that cannot be reached is a
``BrokerUnreachable`` (tangram/errors.py), raised by the client itself.
"""

from __future__ import annotations

from typing import Any

from tangram.errors import InvalidAction, QueueFull, TangramError, Unavailable, class_of_kind


class HttpError(TangramError):
    """An error answer the client has no more specific error for (401, 409, 429, 5xx)."""

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.problem = problem or {}


class Unauthorized(HttpError):
    """401: no token, or not a tenant's token."""


class TooManyQueued(HttpError, QueueFull):
    """429: this tenant, or a pool, has too many queued actions; ``retry_after`` seconds
    to wait. Also a ``QueueFull``, the broker's error for it."""

    def __init__(self, detail: str, problem: dict[str, Any], retry_after: float) -> None:
        super().__init__(429, detail, problem)
        self.retry_after = retry_after


class ServerUnavailable(HttpError, Unavailable):
    """503 after the client's retries: the server cannot make changes durable now (or is
    shutting down); ``retry_after`` seconds to wait. Also an ``Unavailable``."""

    def __init__(self, detail: str, problem: dict[str, Any], retry_after: float) -> None:
        super().__init__(503, detail, problem)
        self.retry_after = retry_after


def raise_for(
    status: int, problem: dict[str, Any], retry_after: float = 1.0, *, url: str | None = None
) -> None:
    """Raise the error for an error answer's problem details; ``url``, the request's,
    goes into the message of a 404 that names no action or lease (a wrong base URL)."""
    detail = str(problem.get("detail") or problem.get("title") or f"HTTP {status}")
    cls = class_of_kind(str(problem.get("type", "")))
    if cls is not None and issubclass(cls, QueueFull):
        raise TooManyQueued(detail, problem, retry_after)
    if cls is not None and issubclass(cls, Unavailable):
        raise ServerUnavailable(detail, problem, retry_after)
    if cls is not None and cls is not TangramError:
        raise cls(detail)
    # Problems of the HTTP layer itself, which no error class stands for.
    if status == 422:  # a request that does not match the schema ("invalid")
        raise InvalidAction(detail)
    if status == 401:
        raise Unauthorized(status, detail, problem)
    if status == 429:
        raise TooManyQueued(detail, problem, retry_after)
    if status == 503:
        raise ServerUnavailable(detail, problem, retry_after)
    if status == 404:
        # No such endpoint: Tangram's own "not-found", or another server's 404 (HTML,
        # JSON of its own). Either way the base URL is the likely mistake.
        where = f" at {url}" if url else ""
        detail = (
            f"no Tangram API endpoint{where}: check the client's base URL (the server's "
            f"root, such as http://127.0.0.1:8000); the server said: {detail}"
        )
    raise HttpError(status, detail, problem)
