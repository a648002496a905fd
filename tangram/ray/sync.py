"""``SyncClient``: the Ray client for synchronous code, safe to call from many threads.

Synchronous environments (SkyRL-Gym's, stepped from a ``ThreadPoolExecutor``) cannot
await. One daemon thread runs an event loop that owns an async ``Client``; every blocking
call hands its coroutine to that loop (``asyncio.run_coroutine_threadsafe``) and waits
for the answer, so all threads share the client's one batched exchange with the broker
actor and its one keep-alive, as ``SyncHttpClient`` does for HTTP."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from tangram.actions import Bound
from tangram.leasing import Beats, SyncLeaseContext
from tangram.ray.client import Client
from tangram.ray.transport import DEFAULT_NAME, DEFAULT_NAMESPACE, RECONNECT
from tangram.spec import Action, Lease, TangramError

T = TypeVar("T")


class SyncClient:
    """The calls of ``tangram.ray.Client``, blocking; ``with SyncClient() as c:``.

    ``close()`` releases what the broker holds for this client and stops its thread."""

    def __init__(
        self,
        broker: Any = None,
        *,
        name: str = DEFAULT_NAME,
        namespace: str = DEFAULT_NAMESPACE,
        reconnect: float = RECONNECT,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tangram-ray-sync", daemon=True
        )
        self._closing = threading.Lock()
        self._closed = False
        self._thread.start()

        async def make() -> Client:
            # Made on the loop it will be bound to.
            return Client(broker, name=name, namespace=namespace, reconnect=reconnect)

        try:
            self._client = self._run(make())
        except BaseException:
            self._stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise TangramError("this client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncClient called from its own event loop; use client.aio")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def aio(self) -> Client:
        """The async client underneath (bound to this client's loop thread)."""
        return self._client

    @property
    def calls(self) -> Counter[str]:
        return self._client.calls

    @property
    def restarts(self) -> int:
        return self._client.restarts

    # ------------------------------------------------------------------ leases
    def acquire(self, action: Action, timeout: float | None = None) -> Lease:
        """Submit and wait for the grant (``TimeoutError`` after ``timeout`` s)."""
        return self._run(self._client.acquire(action, timeout))

    def release(
        self, lease_id: str, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        """Return the lease's units (idempotent); ``LeaseExpired`` if it lapsed first."""
        self._run(self._client.release(lease_id, outcome, None if usage is None else dict(usage)))

    def lease(
        self, action: Action, *, timeout: float | None = None
    ) -> SyncLeaseContext[Action, Lease]:
        """``with client.lease(action) as lease:``, kept alive by the loop thread's
        heartbeats. Keep the context to report usage: ``ctx.report(tokens=n)``."""
        return SyncLeaseContext(self._client.lease(action, timeout=timeout), self._run)

    def hold(self, lease: Lease) -> None:
        """Keep an ``acquire``d lease alive until it is released."""

        async def hold() -> None:
            self._client.hold(lease)

        self._run(hold())

    def heartbeat(self, lease: Lease) -> float | None:
        """Renew one lease now: its new expiry (this process's monotonic clock), or None
        when the renewal is not durable yet; raises the error that ended it."""
        result = self.heartbeat_many([lease]).get(lease.id)
        if isinstance(result, TangramError):
            raise result
        return result

    # The door protocol's calls (tangram.leasing.Door), blocking.
    def release_lease(
        self, lease: Lease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        self._run(self._client.release_lease(lease, outcome, usage))

    def heartbeat_many(self, leases: Sequence[Lease]) -> Beats:
        return self._run(self._client.heartbeat_many(leases))

    def cancel_action(self, action_id: str) -> bool:
        return self._run(self._client.cancel_action(action_id))

    # ------------------------------------------------------------------ other calls
    def close_trajectory(self, trajectory: str) -> int:
        return self._run(self._client.close_trajectory(trajectory))

    def why_waiting(self, action_id: str) -> dict[str, Any] | None:
        return self._run(self._client.why_waiting(action_id))

    def status(self) -> dict[str, Any]:
        return self._run(self._client.status())

    def snapshot(self) -> dict[str, Any]:
        return self._run(self._client.snapshot())

    def pools(self) -> dict[str, dict[str, Any]]:
        return self._run(self._client.pools())

    def run(
        self,
        work: Bound[Any] | Action,
        request: Any = None,
        *,
        trajectory: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Lease, run on the pooled executors, release (``Client.run``)."""
        return self._run(self._client.run(work, request, trajectory=trajectory, timeout=timeout))

    def run_on(self, lease: Lease, request: Any) -> Any:
        return self._run(self._client.run_on(lease, request))

    # ------------------------------------------------------------------ the end
    def close(self) -> None:
        """Close the async client (grants the broker holds for it go back) and stop the
        loop thread. Idempotent; calls after it raise ``TangramError``."""
        with self._closing:
            if self._closed:
                return
            try:
                self._run(self._client.aclose())
            finally:
                self._closed = True
                self._stop()

    def _stop(self) -> None:
        self._closed = True
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
