"""``GET /metrics`` and HTTP request metrics for the lease API.

The broker's metrics (tangram.metrics) and the request metrics share one registry. The
request metrics come from a plain ASGI middleware (it runs on every lease call, so no
per-request objects: the labelled children are looked up once per method, route and
status) and are labelled by route template, never by the raw path.

The template is the matched route's, from the request's scope: FastAPI's routes put
themselves there; plain Starlette routes (the hot submit and release, /metrics) do not,
so they are made as ``TemplateRoute``, which does.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI
from prometheus_client import Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from tangram.broker import Broker
from tangram.metrics import CONTENT_TYPE, Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HTTP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


def install(app: FastAPI, broker: Broker) -> Metrics:
    """Serve the broker's metrics at /metrics and count every request."""
    metrics = Metrics.of(broker.core, broker.clock)
    reg = metrics.registry
    requests = Counter(
        "tangram_http_requests",
        "HTTP requests answered, by route template and status.",
        ("method", "route", "status"),
        registry=reg,
    )
    latency = Histogram(
        "tangram_http_request_duration_seconds",
        "Time to answer an HTTP request (long polls included), by route template.",
        ("method", "route"),
        registry=reg,
        buckets=HTTP_BUCKETS,
    )
    app.add_middleware(_RequestMetrics, requests=requests, latency=latency)

    async def serve_metrics(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    app.router.routes.append(
        TemplateRoute("/metrics", serve_metrics, methods=["GET"], include_in_schema=False)
    )
    return metrics


class TemplateRoute(Route):
    """A plain Starlette route that, like FastAPI's, puts itself in the request's scope
    when it matches (``scope["route"]``), so the request metrics see its template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self
        return match, child


UNMATCHED = "unmatched"


class _RequestMetrics:
    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app = app
        self.requests = requests
        self.latency = latency
        # The labelled children, made on first use: labels() takes a lock and validates
        # its arguments on every call.
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._times: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # what the client sees if the app dies before answering

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            route = scope.get("route")
            # The template, not the path: one series per endpoint, never per id.
            name = getattr(route, "path", None) or UNMATCHED
            method = scope["method"]
            count = self._counts.get((method, name, status))
            if count is None:
                count = self._counts[method, name, status] = self.requests.labels(
                    method, name, str(status)
                )
            count.inc()
            took = self._times.get((method, name))
            if took is None:
                took = self._times[method, name] = self.latency.labels(method, name)
            took.observe(time.perf_counter() - t0)
