"""The broker as a Ray actor: one ``Broker`` (and so one core) behind an async actor.

Clients talk to it with ``exchange``: one call carries a batch of submissions, releases,
heartbeats and cancellations from one client and brings back every grant that client
has waiting, so a client with many concurrent actions makes a handful of Ray calls per
scheduling round instead of several per action. Errors travel as values (class name and
message) so each caller gets the precise ``TangramError`` back.

An HTTP app can be served from the same actor (``serve_http``): it runs on the actor's
event loop and is handed this very ``Broker``, so whichever door a request uses there is
one broker state.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
from collections.abc import Callable
from typing import Any

from tangram.broker import Broker
from tangram.config import Config
from tangram.core.managers.cpu import CpuManager
from tangram.core.managers.gpu import GpuManager
from tangram.spec import Action, Allocation, Lease, TangramError

# A grant as it travels: (lease id, fencing token, allocation, ttl, key pool). The client
# rebuilds the Lease around its own Action, so the action is not sent back.
LeaseWire = tuple[str, int, dict[str, Allocation], float, str | None]
# (action id, grant or None, error class name or None, error message or None)
Delivery = tuple[str, LeaseWire | None, str | None, str | None]
# (lease id, error class name or None, message or None)
Outcome = tuple[str, str | None, str | None]
Reply = tuple[list[Delivery], list[Outcome], list[Outcome]]

LONG_POLL_MAX = 5.0  # the longest a client's poll waits before it asks again


class BrokerActor:
    """Wrapped with ``ray.remote`` by ``tangram.ray.start_broker``; plain to test."""

    def __init__(self, config: Config, *, name: str = "tangram", namespace: str = "tangram"):
        self.config = config
        self.name = name
        self.namespace = namespace
        self.broker = Broker.from_config(config)
        # A restarted actor starts empty, with no journal: without this its fencing
        # counter would start again at 1, below tokens the executors have already seen,
        # and they would refuse every new lease as stale. Starting from the wall clock in
        # microseconds keeps tokens above those of any earlier life of this actor.
        self.broker.core.resume(time.time_ns() // 1000, 0)
        self._inbox: dict[str, list[Delivery]] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._gone: set[str] = set()  # clients that said goodbye: grants go back
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ introspection
    async def ping(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "pools": self.pools()}

    async def describe(self) -> dict[str, dict[str, Any]]:
        return self.pools()

    def pools(self) -> dict[str, dict[str, Any]]:
        """Pool name -> kind and node names (what a client needs to find executors)."""
        out: dict[str, dict[str, Any]] = {}
        for pool, mgr in self.broker.core.pools.items():
            nodes = list(getattr(mgr, "nodes", {}))
            out[pool] = {"kind": mgr.kind, "nodes": nodes}
        return out

    async def snapshot(self) -> dict[str, Any]:
        return self.broker.snapshot()

    async def counters(self, pool: str) -> dict[str, float]:
        """A pool's accounting beyond the snapshot: tokens estimated and reported, GPU
        restores, evictions, cache hits and the current restore cost per service."""
        mgr = self.broker.core.pools[pool]
        names = (
            "tokens_estimated_total",
            "tokens_used_total",
            "restores",
            "evictions",
            "cache_hits",
            "restore_seconds_total",
        )
        out = {n: float(getattr(mgr, n)) for n in names if hasattr(mgr, n)}
        if isinstance(mgr, GpuManager):
            for svc in mgr.services.values():
                out[f"restore_seconds:{svc.name}"] = svc.restore_seconds
        return out

    # ------------------------------------------------------------------ the batched door
    async def exchange(
        self,
        client: str,
        submits: list[Action],
        releases: list[tuple[str, str, dict[str, Any] | None]],
        beats: list[str],
        cancels: list[str],
        wait: float = 0.0,
    ) -> Reply:
        """Apply a client's batch, then return its grants (waiting up to ``wait`` seconds
        for one when it has none)."""
        broker = self.broker
        self._gone.discard(client)
        inbox = self._inbox.setdefault(client, [])
        released: list[Outcome] = []
        for lease_id, outcome, usage in releases:
            try:
                broker.release(lease_id, outcome, usage)
                released.append((lease_id, None, None))
            except TangramError as exc:
                released.append((lease_id, type(exc).__name__, str(exc)))
        failed: list[Outcome] = []
        for lease_id in beats:
            try:
                broker.heartbeat(lease_id)
            except TangramError as exc:
                failed.append((lease_id, type(exc).__name__, str(exc)))
        for action_id in cancels:
            broker.cancel(action_id)  # its waiter resolves with ActionCancelled
        for action in submits:
            try:
                fut = broker.submit_nowait(action)
            except TangramError as exc:
                inbox.append((action.id, None, type(exc).__name__, str(exc)))
                continue
            fut.add_done_callback(self._deliverer(client, action.id))
        if submits or releases:
            # Let the round this batch triggered run and its grants reach the inbox.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        if not inbox and wait > 0:
            event = self._events.get(client)
            if event is None:
                event = self._events[client] = asyncio.Event()
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(wait, LONG_POLL_MAX))
        inbox = self._inbox.get(client, [])
        self._inbox[client] = []
        return inbox, released, failed

    def _deliverer(self, client: str, action_id: str) -> Callable[[asyncio.Future[Lease]], None]:
        def deliver(fut: asyncio.Future[Lease]) -> None:
            if fut.cancelled():
                item: Delivery = (action_id, None, "ActionCancelled", "the broker was closed")
            elif fut.exception() is not None:
                exc = fut.exception()
                item = (action_id, None, type(exc).__name__, str(exc))
            else:
                lease = fut.result()
                if client in self._gone:  # nobody will ever pick it up
                    self.broker.release(lease.id, "abandoned")
                    return
                wire = (
                    lease.id,
                    lease.fencing_token,
                    lease.allocation,
                    lease.ttl,
                    lease.action.key,
                )
                item = (action_id, wire, None, None)
            self._inbox.setdefault(client, []).append(item)
            event = self._events.get(client)
            if event is not None:
                event.set()

        return deliver

    async def goodbye(self, client: str) -> int:
        """The client is closing: give back grants it never picked up; return how many."""
        self._gone.add(client)
        self._events.pop(client, None)
        n = 0
        for _, wire, _, _ in self._inbox.pop(client, []):
            if wire is not None:
                with contextlib.suppress(TangramError):
                    self.broker.release(wire[0], "abandoned")
                n += 1
        return n

    # ------------------------------------------------------------------ other operations
    async def close_trajectory(self, trajectory: str) -> int:
        """Close the trajectory in the broker and remove its sandbox working directory
        on the node it was pinned to. Returns how many queued actions were cancelled."""
        pinned = [
            (pool, mgr.pins[trajectory][0])
            for pool, mgr in self.broker.core.pools.items()
            if isinstance(mgr, CpuManager) and trajectory in mgr.pins
        ]
        cancelled = self.broker.close_trajectory(trajectory)
        from tangram.ray.executors import find_executor  # beside ray, not at import time

        for pool, node in pinned:
            handle = find_executor(self.name, self.namespace, "sandbox", pool, node)
            if handle is not None:
                with contextlib.suppress(Exception):  # a dead executor has no directory
                    await handle.close_trajectory.remote(trajectory)
        return cancelled

    async def observe_restore(self, pool: str, service: str, seconds: float) -> None:
        """Feed a measured restore time into the GPU pool's cost model."""
        mgr = self.broker.core.pools.get(pool)
        if isinstance(mgr, GpuManager) and service in mgr.services:
            mgr.observe_restore(service, seconds)

    async def service_restore_seconds(self, pool: str, service: str) -> float:
        mgr = self.broker.core.pools[pool]
        assert isinstance(mgr, GpuManager)
        return mgr.services[service].restore_seconds

    # ------------------------------------------------------------------ the HTTP hook
    async def serve_http(
        self,
        app_factory: Callable[[Broker], Any] | str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> int:
        """Serve an HTTP app on this actor's event loop over this actor's broker; return
        the port. By default the project's lease API (``tangram.server``); otherwise
        ``app_factory`` (a callable taking the ``Broker``, or ``"module:function"``)."""
        import uvicorn

        if self._http is not None:
            raise RuntimeError("this broker actor already serves HTTP")
        if app_factory is None:
            app = self._lease_api()
        else:
            factory = app_factory
            if isinstance(factory, str):
                mod, _, fn = factory.partition(":")
                try:
                    factory = getattr(importlib.import_module(mod), fn)
                except (ImportError, AttributeError) as exc:
                    raise RuntimeError(
                        f"cannot load the HTTP app factory {mod}:{fn} ({exc})"
                    ) from None
            assert callable(factory)
            app = factory(self.broker)
        # No lifespan: the server's shutdown hook would close the broker, which outlives
        # the HTTP door here (Ray clients keep using it).
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        self._http = server
        self._http_task = asyncio.get_running_loop().create_task(server.serve())
        while not server.started:
            if self._http_task.done():
                self._http = None
                self._http_task.result()  # raises the server's error
                raise RuntimeError("the HTTP server stopped at start-up")
            await asyncio.sleep(0.01)
        sock = server.servers[0].sockets[0]
        return int(sock.getsockname()[1])

    def _lease_api(self) -> Any:
        """The project's HTTP lease API over this actor's broker (one broker state, one
        metrics registry, whichever door a request uses)."""
        from tangram.server.app import create_app

        return create_app(self.config, broker=self.broker)

    async def stop_http(self) -> None:
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                await self._http_task
            self._http = None
