"""Running requests on leased units: a ``Command`` on the sandbox executor of the
lease's CPU node, a ``ServiceCall`` on the service executor of its GPU node, an
``HttpCall`` from this process under the lease's quota."""

from __future__ import annotations

from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from tangram.executors.api import HttpCall, HttpCaller
from tangram.executors.fencing import FencingError, StaleLease
from tangram.executors.sandbox import Command
from tangram.executors.service import ServiceCall
from tangram.ray.executors import executor_name
from tangram.spec import InvalidAction, Lease, TangramError

Pools = dict[str, dict[str, Any]]  # the broker's ``describe``: pool name -> kind, nodes


class ExecutorError(TangramError):
    """The executor running the action failed (its actor died); the units were returned."""


def check_request(request: Any) -> None:
    # Bad input fails here, before the action waits in the queue.
    if not isinstance(request, (Command, ServiceCall, HttpCall)):
        raise InvalidAction(
            f"cannot run {type(request).__name__}: give a Command, ServiceCall or HttpCall"
        )
    if isinstance(request, (Command, HttpCall)):
        request.check()


class Runner:
    """One per client: finds the executor actors of the broker ``name`` (handles cached)
    and runs requests on them with the lease's units and signed grant."""

    def __init__(self, broker: Any, name: str, namespace: str) -> None:
        self.broker = broker
        self.name = name
        self.namespace = namespace
        self._executors: dict[tuple[str, str, str], Any] = {}
        self._http: HttpCaller | None = None

    async def dispatch(
        self, lease: Lease, request: Any, pools: Pools
    ) -> tuple[Any, dict[str, Any] | None]:
        """The result, and the usage to report with the release (an HTTP call's tokens)."""
        if isinstance(request, Command):
            return await self._run_command(lease, request, pools), None
        if isinstance(request, ServiceCall):
            return await self._run_service(lease, request, pools), None
        if self._http is None:
            self._http = HttpCaller()
        result = await self._http.call(request)
        return result, ({"tokens": result.tokens} if result.tokens is not None else None)

    def _pool_of(self, lease: Lease, kind: str, pools: Pools) -> str:
        key = lease.action.key
        if key is not None and pools.get(key, {}).get("kind") == kind:
            return key
        for p in lease.allocation:
            if pools.get(p, {}).get("kind") == kind:
                return p
        raise InvalidAction(
            f"action {lease.action.id!r} demands no {kind} pool; demands: "
            + ", ".join(lease.allocation)
        )

    def _executor(self, kind: str, pool: str, node: str) -> Any:
        k = (kind, pool, node)
        handle = self._executors.get(k)
        if handle is None:
            name = executor_name(self.name, kind, pool, node)
            try:
                handle = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                raise ExecutorError(
                    f"no {kind} executor {name!r} for node {node!r} of pool {pool!r}; "
                    "start_broker(..., executors=True) starts them"
                ) from None
            self._executors[k] = handle
        return handle

    async def _call(self, lease: Lease, kind: str, pool: str, method: str, *args: Any) -> Any:
        node = lease.allocation[pool].node or ""
        handle = self._executor(kind, pool, node)
        try:
            return await getattr(handle, method).remote(*args)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            # The executor refused the grant (an expired or superseded lease, a missing or
            # forged grant, other units): say so plainly, not as a remote traceback.
            where = f" (lease {lease.id}, action {lease.action.id!r})"
            if isinstance(cause, StaleLease):
                raise StaleLease(f"{cause}{where}", cause.token, cause.newest) from None
            if isinstance(cause, FencingError):
                raise type(cause)(f"{cause}{where}") from None
            raise
        except RayActorError as exc:
            self._executors.pop((kind, pool, node), None)
            what = (
                "was unavailable (restarting) for"
                if isinstance(exc, ActorUnavailableError)
                else "died while running"
            )
            raise ExecutorError(
                f"the {kind} executor of node {node!r} (pool {pool!r}) {what} "
                f"action {lease.action.id!r} of trajectory {lease.action.trajectory!r}; "
                f"lease {lease.id} is released and its units returned ({type(exc).__name__})"
            ) from exc

    async def _run_command(self, lease: Lease, cmd: Command, pools: Pools) -> Any:
        pool = self._pool_of(lease, "cpu", pools)
        alloc = lease.allocation[pool]
        dop = alloc.amount if lease.action.key in (pool, None) else lease.dop
        return await self._call(
            lease,
            "sandbox",
            pool,
            "run",
            lease.action.trajectory,
            cmd,
            alloc.units,
            dop,
            lease.grant,
        )

    async def _run_service(self, lease: Lease, call: ServiceCall, pools: Pools) -> Any:
        service = lease.action.service
        if service is None:
            raise InvalidAction("a ServiceCall needs an action with service=...")
        pool = self._pool_of(lease, "gpu", pools)
        alloc = lease.allocation[pool]
        result = await self._call(
            lease,
            "service",
            pool,
            "run",
            service,
            alloc.units,
            alloc.evicts,
            call.payload,
            lease.grant,
        )
        if result.restored:
            # The measured copy time corrects the pool's restore cost (fire and forget).
            self.broker.observe_restore.remote(
                pool, service, result.restore_seconds, result.woke_from == 2
            )
        return result

    async def sandbox_call(self, lease: Lease, pools: Pools, method: str, *args: Any) -> Any:
        """Call ``method(trajectory, *args, cores, grant)`` on the sandbox executor of the
        lease's CPU node (a file moved in or out under the lease)."""
        pool = self._pool_of(lease, "cpu", pools)
        alloc = lease.allocation[pool]
        return await self._call(
            lease, "sandbox", pool, method, lease.action.trajectory, *args, alloc.units, lease.grant
        )

    async def sandbox_status(self, trajectory: str, pool: str, node: str) -> dict[str, Any]:
        handle = self._executor("sandbox", pool, node)
        status: dict[str, Any] = await handle.status.remote(trajectory)
        return status

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
