"""``SyncHttpClient``: the HTTP client for scripts without asyncio.

An event loop runs in a daemon thread, so a lease's heartbeats (the ``HttpClient``'s
keep-alive) go on while the script's own code runs in the ``with`` body."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from tangram.client.http import ActionLike, ActionState, HttpClient
from tangram.client.wire import RemoteLease
from tangram.leasing import Beats, SyncLeaseContext

T = TypeVar("T")


class SyncHttpClient:
    """The same calls as ``HttpClient``, blocking. ``with SyncHttpClient(url) as c:``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", **kw: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> HttpClient:
            return HttpClient(base_url, **kw)

        self._client = self._run(make())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncHttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, action: ActionLike, **kw: Any) -> ActionState:
        return self._run(self._client.submit(action, **kw))

    def get(self, action_id: str, *, wait: float = 0.0) -> ActionState:
        return self._run(self._client.get(action_id, wait=wait))

    def cancel(self, action_id: str) -> ActionState:
        return self._run(self._client.cancel(action_id))

    def heartbeat(
        self, lease_id: str, ttl: float | None = None, *, fencing_token: int | None = None
    ) -> float:
        return self._run(self._client.heartbeat(lease_id, ttl, fencing_token=fencing_token))

    def release(
        self,
        lease_id: str,
        outcome: str = "ok",
        usage: Mapping[str, Any] | None = None,
        *,
        fencing_token: int | None = None,
    ) -> None:
        self._run(self._client.release(lease_id, outcome, usage, fencing_token=fencing_token))

    def close_trajectory(self, trajectory: str) -> int:
        return self._run(self._client.close_trajectory(trajectory))

    def pools(self) -> dict[str, Any]:
        return self._run(self._client.pools())

    def status(self) -> dict[str, Any]:
        return self._run(self._client.status())

    def acquire(self, action: ActionLike, timeout: float | None = None) -> RemoteLease:
        return self._run(self._client.acquire(action, timeout))

    # The door protocol's calls (tangram.leasing.Door), blocking.
    def release_lease(
        self, lease: RemoteLease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        self._run(self._client.release_lease(lease, outcome, usage))

    def heartbeat_many(self, leases: Sequence[RemoteLease]) -> Beats:
        return self._run(self._client.heartbeat_many(leases))

    def cancel_action(self, action_id: str) -> bool:
        return self._run(self._client.cancel_action(action_id))

    def lease(
        self, action: ActionLike, *, timeout: float | None = None
    ) -> SyncLeaseContext[ActionLike, RemoteLease]:
        """``with client.lease(action) as lease:``; heartbeats run in the loop thread.
        Keep the context to report usage: ``ctx.report(tokens=n)`` in the body."""
        return SyncLeaseContext(self._client.lease(action, timeout=timeout), self._run)
