"""The API call executor: one HTTP call under a quota pool's lease.

The call runs in the caller's process (an API needs no pinned executor); what Tangram adds
is the lease around it, so concurrency, rate and tokens-per-minute limits hold across every
worker, and the actual token usage read from the response, reported at release so the
pool's tokens-per-minute bucket is corrected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


class ApiError(ValueError):
    """A malformed call; the message says which field."""


@dataclass(frozen=True, slots=True)
class HttpCall:
    """An HTTP request. ``usage_path`` is where the response JSON holds the tokens used
    (OpenAI style by default: ``usage.total_tokens``)."""

    url: str
    method: str = "POST"
    json: Any = None
    headers: Mapping[str, str] | None = None
    timeout: float = 60.0
    usage_path: Sequence[str] = ("usage", "total_tokens")

    def check(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ApiError(f"url must start with http:// or https://, got {self.url!r}")
        if self.method.upper() not in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            raise ApiError(f"unsupported HTTP method {self.method!r}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ApiError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


@dataclass(slots=True)
class HttpResult:
    status: int
    body: Any  # the decoded JSON, or the text when the response is not JSON
    tokens: int | None  # read from ``usage_path``; None when the response has none
    seconds: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def tokens_in(body: Any, path: Sequence[str]) -> int | None:
    node = body
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)) or node < 0:
        return None
    return int(node)


class HttpCaller:
    """Makes calls with one shared connection pool (``httpx.AsyncClient``)."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        self._client = client
        self._owned = client is None

    async def call(self, req: HttpCall) -> HttpResult:
        req.check()
        if self._client is None:
            self._client = httpx.AsyncClient()
        resp = await self._client.request(
            req.method.upper(),
            req.url,
            json=req.json,
            headers=dict(req.headers or {}),
            timeout=req.timeout,
        )
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        return HttpResult(
            status=resp.status_code,
            body=body,
            tokens=tokens_in(body, req.usage_path),
            seconds=resp.elapsed.total_seconds(),
        )

    async def aclose(self) -> None:
        if self._client is not None and self._owned:
            await self._client.aclose()
            self._client = None
