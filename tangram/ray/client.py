"""The Ray client: the broker's lease interface from any Ray driver, task or actor.

``async with client.lease(action) as lease:`` holds exact units for the body, like the
in-process ``Broker.lease``; ``await client.run(...)`` runs an action end to end on the
pooled executors (``execute.py``). Every call, heartbeats included, goes through one
batched exchange with the broker actor (``transport.py``), so one client sustains many
concurrent actions from one process cheaply."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from tangram.actions import Bound
from tangram.leasing import Beats, KeepAlive, LeaseContext
from tangram.ray.execute import ExecutorError, Runner, check_request
from tangram.ray.sandbox import Sandbox
from tangram.ray.transport import (
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    RECONNECT,
    BrokerNotFound,
    Transport,
    get_broker,
)
from tangram.spec import (
    Action,
    ActionCancelled,
    InvalidAction,
    Lease,
    LeaseExpired,
    LeaseReleased,
    TangramError,
)

# Names that lived here before the transport and the execution had modules of their own.
__all__ = [
    "DEFAULT_NAME",
    "DEFAULT_NAMESPACE",
    "RECONNECT",
    "BrokerNotFound",
    "Client",
    "ExecutorError",
    "get_broker",
]


class Client:
    """One per process (or per actor) is enough; it is bound to the event loop that
    first uses it. While the broker actor is unreachable (Ray restarting it) calls are
    sent again for up to ``reconnect`` seconds before what waits on them fails."""

    def __init__(
        self,
        broker: Any = None,
        *,
        name: str = DEFAULT_NAME,
        namespace: str = DEFAULT_NAMESPACE,
        reconnect: float = RECONNECT,
    ) -> None:
        self.broker = broker if broker is not None else get_broker(name, namespace)
        self.name = name
        self.namespace = namespace
        self.id = f"c{uuid.uuid4().hex[:12]}"
        self._seq = itertools.count(1)
        # Leases held by a body (``lease``, ``hold``, ``run``): heartbeats renew their
        # grants in place. ``_lost``: held leases that failed a heartbeat, and why.
        self._keep: KeepAlive[Lease] = KeepAlive(self.heartbeat_many)
        self._lost = self._keep.lost
        self._link = Transport(
            self.broker, self.id, self._keep, name=name, namespace=namespace, reconnect=reconnect
        )
        self._runner = Runner(self.broker, name, namespace)
        self._pools: dict[str, dict[str, Any]] | None = None

    @property
    def reconnect(self) -> float:
        return self._link.reconnect

    @reconnect.setter
    def reconnect(self, seconds: float) -> None:
        self._link.reconnect = seconds

    @property
    def calls(self) -> Counter[str]:
        """Ray calls made to the broker, by kind: what the batching saves is visible here."""
        return self._link.calls

    @property
    def restarts(self) -> int:
        """New lives of the broker actor this client has seen."""
        return self._link.restarts

    @property
    def _waiting(self) -> dict[str, asyncio.Future[Lease]]:
        # Action id -> its caller's future, while the action waits for a grant.
        return self._link.waiting

    # ------------------------------------------------------------------ leases
    async def acquire(self, action: Action, timeout: float | None = None) -> Lease:
        """Submit and wait for the grant; on timeout or cancellation the action leaves
        the queue and a grant that raced with it is given back."""
        if self._link.closed:
            raise TangramError("this client is closed")
        if not action.id:
            action.id = f"{self.id}-{next(self._seq)}"
        fut = self._link.submit(action)
        try:
            if timeout is None:
                return await fut
            return await asyncio.wait_for(fut, timeout)
        except BaseException:
            self._link.withdraw(action.id)
            raise

    async def release(
        self, lease_id: str, outcome: str = "ok", usage: dict[str, Any] | None = None
    ) -> None:
        """Return the lease's units. Releasing twice is fine; LeaseExpired if it expired."""
        lost = self._keep.drop(lease_id)
        fut = self._link.release(lease_id, outcome, usage)
        with contextlib.suppress(LeaseReleased):
            await asyncio.shield(fut)
        if lost is not None and isinstance(lost, LeaseExpired):
            raise lost

    def lease(self, action: Action, *, timeout: float | None = None) -> LeaseContext[Action, Lease]:
        """``async with client.lease(action) as lease:``, kept alive by batched heartbeats."""
        return LeaseContext(self, self._keep, action, timeout)

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` alive with the batched heartbeats until it is released."""
        self._keep.hold(lease)

    # ------------------------------------------------------------------ the door protocol
    async def release_lease(
        self, lease: Lease, outcome: str = "ok", usage: Mapping[str, Any] | None = None
    ) -> None:
        await self.release(lease.id, outcome, None if usage is None else dict(usage))

    async def heartbeat_many(self, leases: Sequence[Lease]) -> Beats:
        """Renew the leases in the next exchange (one Ray call, with whatever else is in
        the outbox) and wait for its reply: each lease gets its re-signed grant, and the
        answer says when it expires now (at the latest: sent + TTL, on this process's
        clock) or why it failed. A renewal the broker could not make durable yet is left
        out; the next beat sends it again."""
        return await self._link.heartbeat_many(leases)

    async def cancel_action(self, action_id: str) -> bool:
        """Take an action this client waits for out of the queue: its ``acquire`` raises
        ActionCancelled (a grant that raced the cancel is given back). False if this
        client does not wait for it."""
        fut = self._link.waiting.get(action_id)
        if fut is None:
            return False
        self._link.withdraw(action_id)
        if not fut.done():
            fut.set_exception(ActionCancelled(f"action {action_id!r} was cancelled"))
        return True

    # ------------------------------------------------------------------ other calls
    async def close_trajectory(self, trajectory: str) -> int:
        """Close the trajectory (its pinned memory, queued actions, sandbox directory)."""
        return int(await self.broker.close_trajectory.remote(trajectory))

    async def why_waiting(self, action_id: str) -> dict[str, Any] | None:
        """Why an action this client submitted still waits: which pool holds it and why
        (``reason``, ``message``, and what the pool adds: ``node``, ``needs``, ``free``,
        ``ahead``, ``ready_at`` in Unix time); None once it is granted or gone."""
        why: dict[str, Any] | None = await self.broker.why_waiting.remote(action_id)
        return why

    async def status(self) -> dict[str, Any]:
        """The pools, the queue per tenant, the oldest waiters and why they wait, the
        leases by age: what ``tangram status`` shows of an HTTP broker."""
        doc: dict[str, Any] = await self.broker.overview.remote()
        return doc

    async def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = await self.broker.snapshot.remote()
        return snap

    async def pools(self) -> dict[str, dict[str, Any]]:
        if self._pools is None:
            self._pools = await self.broker.describe.remote()
        return self._pools

    # ------------------------------------------------------------------ end to end
    async def run(
        self,
        work: Bound[Any] | Action,
        request: Any = None,
        *,
        trajectory: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Lease, run the request on its executor, release; return the executor's result.

        ``work`` is a ``Bound`` from an ``@tangram.action`` function (then give
        ``trajectory``) or an ``Action`` (then give ``request``): a ``Command``, a
        ``ServiceCall`` or an ``HttpCall``. A failure of the executor raises
        ``ExecutorError``; the units go back in every case."""
        if isinstance(work, Bound):
            if trajectory is None:
                raise InvalidAction("client.run(bound) needs trajectory=...")
            action, request = work.action(trajectory), work.request
        else:
            action = work
        check_request(request)
        await self.pools()  # before leasing: no units held while it is asked
        ctx = self.lease(action, timeout=timeout)
        async with ctx as lease:
            result, ctx.usage = await self._runner.dispatch(lease, request, await self.pools())
        return result

    async def run_on(self, lease: Lease, request: Any) -> Any:
        """Run a request on the units of a lease you already hold (it stays held): for
        callers that lease once and run several commands, like a per-trajectory
        reservation. Token usage of an ``HttpCall`` is not reported this way."""
        check_request(request)
        result, _ = await self._runner.dispatch(lease, request, await self.pools())
        return result

    def sandbox(
        self,
        trajectory: str,
        pool: str = "cpu",
        *,
        task: str = "sandbox",
        timeout: float | None = None,
    ) -> Sandbox:
        """The trajectory's sandbox on ``pool`` as one object (``exec``, ``upload``,
        ``download``, ``status``, ``close``; tangram/ray/sandbox.py); ``timeout`` bounds
        each operation's wait for its lease."""
        return Sandbox(self, trajectory, pool, task=task, timeout=timeout)

    async def aclose(self) -> None:
        """Stop the pump; grants the broker holds for this client go back."""
        if self._link.closed:
            return
        self._keep.close()
        await self._link.aclose()
        await self._runner.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
