"""Executor actors, one per pool node, placed on their Ray node by node affinity.

A CPU pool's node ``n`` gets a ``SandboxActor`` named ``<broker>.sandbox.<pool>.<n>``; a
GPU pool's node gets a ``ServiceActor`` named ``<broker>.service.<pool>.<n>``. Clients
find them by those names from the lease's allocation (pool and node), so no lookup goes
through the broker on the hot path.

Every executor gets the broker's fencing key as a constructor argument (Ray runs a
restarted actor's constructor again with the same arguments, so a restarted executor
still checks grants) and refuses calls without a valid signed grant for exactly its
units; there is no unfenced mode behind a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tangram.config import Config
from tangram.executors.fencing import SignedGrant, key_id
from tangram.executors.sandbox import Command, CommandResult, Limits, SandboxRunner
from tangram.executors.service import ServiceHost, ServiceResult, ServiceSpec
from tangram.kinds.cpu import SandboxConfig
from tangram.spec import Resident, TangramError

if TYPE_CHECKING:
    from tangram.executors.container import ContainerRunner


class PlacementError(ValueError):
    """A pool node cannot be matched to a Ray node; the message says how to fix it."""


class FencingKeyMismatch(TangramError):
    """An executor already running holds another fencing key than the broker's."""


def sandbox_runner(
    root: str,
    node: str,
    isolate: bool,
    fencing_key: bytes,
    pool: str,
    sandbox: Mapping[str, Any] | None = None,
) -> SandboxRunner | ContainerRunner:
    """The runner a CPU pool's ``sandbox`` configuration asks for (``SandboxConfig``):
    bubblewrap (``isolate=False``: none, trusted code only) or a container per
    trajectory."""
    opts = SandboxConfig.model_validate(dict(sandbox or {}))
    limits = Limits(
        memory_mb=opts.memory_mb,
        max_procs=opts.max_procs,
        max_file_mb=opts.max_file_mb,
        tmp_mb=opts.tmp_mb,
    )
    if opts.backend == "container":
        from tangram.executors.container import ContainerRunner

        assert opts.image is not None  # the configuration's validator saw to it
        return ContainerRunner(
            root,
            node,
            image=opts.image,
            limits=limits,
            network=opts.network,
            pool=pool,
            fencing_key=fencing_key,
            idle_timeout=opts.idle_timeout_s,
        )
    return SandboxRunner(
        root,
        node,
        isolate=isolate,
        limits=limits,
        pool=pool,
        fencing_key=fencing_key,
        confine=opts.confine,
        network=opts.network,
    )


class SandboxActor:
    """A sandbox runner on one node (wrapped with ``ray.remote`` when started): runs
    commands, and moves files in and out, under the lease's signed grant."""

    def __init__(
        self,
        root: str,
        node: str,
        isolate: bool,
        fencing_key: bytes,
        pool: str,
        sandbox: Mapping[str, Any] | None = None,
    ) -> None:
        self.runner = sandbox_runner(root, node, isolate, fencing_key, pool, sandbox)
        self.key_id = key_id(fencing_key)
        self._sweeper: asyncio.Task[None] | None = None

    def _sweep(self) -> None:
        """Start, once, the loop that removes containers idle past the runner's
        ``idle_timeout`` (a trajectory whose client vanished without closing it, and
        that the broker has not closed yet). The actor's constructor runs outside its
        event loop, so the first call starts it."""
        idle = getattr(self.runner, "close_idle", None)
        timeout = getattr(self.runner, "idle_timeout", None)
        if self._sweeper is not None or idle is None or timeout is None:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(min(60.0, max(1.0, timeout / 4)))
                with contextlib.suppress(Exception):  # keep sweeping; the next try may work
                    await idle()

        self._sweeper = asyncio.get_running_loop().create_task(loop())

    async def run(
        self,
        trajectory: str,
        cmd: Command,
        cores: Sequence[int],
        dop: int,
        grant: SignedGrant | None = None,
    ) -> CommandResult:
        self._sweep()
        result = await self.runner.run(trajectory, cmd, cores, dop, grant)
        result.extra["ray_node"] = ray.get_runtime_context().get_node_id()
        result.extra["executor_pid"] = os.getpid()
        return result

    def _admit(self, cores: Sequence[int], grant: SignedGrant | None) -> None:
        runner = self.runner
        where = f"node {runner.node or 'here'}"
        runner.fence.admit(tuple(cores), grant, where, node=runner.node, pool=runner.pool)

    async def upload(
        self,
        trajectory: str,
        path: str,
        data: bytes,
        cores: Sequence[int],
        grant: SignedGrant | None = None,
    ) -> None:
        self._admit(cores, grant)
        self._sweep()
        await self.runner.upload(trajectory, path, data)

    async def download(
        self, trajectory: str, path: str, cores: Sequence[int], grant: SignedGrant | None = None
    ) -> bytes:
        self._admit(cores, grant)
        return await self.runner.download(trajectory, path)

    async def status(self, trajectory: str) -> dict[str, Any]:
        return await self.runner.status(trajectory)

    async def close_trajectory(self, trajectory: str) -> bool:
        return await asyncio.to_thread(self.runner.close_trajectory, trajectory)

    async def shutdown(self) -> None:
        """Kill every running command and remove every container (the broker is being
        stopped; ``ray.kill`` that follows gives no chance to clean up)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.to_thread(self.runner.kill_all)

    async def trajectories(self) -> list[str]:
        return self.runner.trajectories()

    async def info(self) -> dict[str, Any]:
        return {
            "node": self.runner.node,
            "ray_node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "root": str(self.runner.root),
            "running": len(getattr(self.runner, "running", ())),
            "backend": type(self.runner).__name__,
            "isolated": getattr(self.runner, "isolate", True),
            "key_id": self.key_id,
        }


class ServiceActor:
    """A ``ServiceHost`` on one GPU node; services are loaded at start-up."""

    def __init__(
        self,
        node: str,
        device_kind: str,
        services: Sequence[ServiceSpec],
        fencing_key: bytes,
        pool: str,
        gpus: int = 0,
    ) -> None:
        # ``gpus``: the node's GPU count in the pool, for the chunks a pre-launched
        # engine service starts an instance on (tangram/executors/engines.py).
        self.host = ServiceHost(node, device_kind, pool=pool, fencing_key=fencing_key, gpus=gpus)
        self.key_id = key_id(fencing_key)
        for spec in services:
            self.host.register(spec)

    async def run(
        self,
        service: str,
        units: Sequence[int],
        evicts: Sequence[Resident],
        payload: Any,
        grant: SignedGrant | None = None,
    ) -> ServiceResult:
        return await self.host.run(service, units, evicts, payload, grant)

    async def shutdown(self) -> None:
        """Stop every engine instance (their processes run in sessions of their own and
        would outlive the actor, holding their GPUs)."""
        await asyncio.to_thread(self.host.close)

    async def info(self) -> dict[str, Any]:
        return {
            "node": self.host.node,
            "ray_node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "services": sorted(self.host.specs),
            "resident": self.host.residents(),
            "key_id": self.key_id,
        }


def executor_name(broker: str, kind: str, pool: str, node: str) -> str:
    return f"{broker}.{kind}.{pool}.{node}"


def find_executor(broker: str, namespace: str, kind: str, pool: str, node: str) -> Any:
    """The executor actor's handle, or None when there is none."""
    try:
        return ray.get_actor(executor_name(broker, kind, pool, node), namespace=namespace)
    except ValueError:
        return None


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]


def resolve_node(
    name: str, placement: Mapping[str, str] | None, nodes: list[dict[str, Any]]
) -> str:
    """The Ray node id for pool node ``name``: from ``placement``, else the node whose
    id is ``name`` (pools built by ``cpu_pool_from_ray``), else the only node there is."""
    ids = {str(n["NodeID"]) for n in nodes}
    if placement is not None and name in placement:
        node_id = str(placement[name])
        if node_id not in ids:
            raise PlacementError(
                f"placement maps node {name!r} to {node_id!r}, not an alive Ray node"
            )
        return node_id
    if name in ids:
        return name
    if len(ids) == 1:
        return next(iter(ids))
    raise PlacementError(
        f"pool node {name!r} is not a Ray node id and the cluster has {len(ids)} nodes; "
        "pass placement={pool node name: Ray node id} or build the pool with "
        "tangram.ray.cpu_pool_from_ray()"
    )


def start_executors(
    config: Config,
    *,
    broker: str,
    namespace: str,
    fencing_key: bytes,
    services: Iterable[ServiceSpec] = (),
    placement: Mapping[str, str] | None = None,
    sandbox_root: str | None = None,
    sandbox_isolate: bool = True,
    device_kind: str = "cpu",
    max_restarts: int = 3,
    detached: bool = True,
) -> list[Any]:
    """Start (or find) one executor actor per CPU and GPU pool node, each checking grants
    with ``fencing_key``; wait until each answers. Returns their handles. Raises
    ``FencingKeyMismatch`` when an executor found running holds another key."""
    nodes = alive_nodes()
    specs = list(services)
    root = sandbox_root or os.path.join(tempfile.gettempdir(), "tangram-sandbox", broker)
    started: list[Any] = []
    # A sandbox executor per node of each CPU pool, a service executor per node of each
    # GPU pool (by kind name: which executor runs what is this module's business).
    for pool, mgr in config.build_pools().items():
        if mgr.kind == "cpu":
            for node in mgr.partitions():
                cls: Any = ray.remote(SandboxActor)
                opts = _options(
                    executor_name(broker, "sandbox", pool, node),
                    namespace,
                    resolve_node(node, placement, nodes),
                    max_restarts,
                    detached,
                )
                sandbox = config.pools[pool].sandbox.model_dump()  # type: ignore[union-attr]
                started.append(
                    cls.options(**opts).remote(
                        os.path.join(root, pool, node),
                        node,
                        sandbox_isolate,
                        fencing_key,
                        pool,
                        sandbox,
                    )
                )
        elif mgr.kind == "gpu":
            gpus = mgr.usage()
            for node in mgr.partitions():
                cls = ray.remote(ServiceActor)
                opts = _options(
                    executor_name(broker, "service", pool, node),
                    namespace,
                    resolve_node(node, placement, nodes),
                    max_restarts,
                    detached,
                )
                if device_kind == "cuda":
                    opts["num_gpus"] = gpus[node][0]
                started.append(
                    cls.options(**opts).remote(
                        node, device_kind, specs, fencing_key, pool, gpus[node][0]
                    )
                )
    infos = ray.get([h.info.remote() for h in started])
    # ``get_if_exists`` hands back an executor that outlived an earlier broker: with
    # another key it would refuse every grant of this one, so say so now.
    want = key_id(fencing_key)
    stale = [str(i["node"]) for i in infos if i.get("key_id") != want]
    if stale:
        raise FencingKeyMismatch(
            f"executors of nodes {stale} already run with another fencing key (key id "
            f"{want} expected): they were started for an earlier broker of this name; stop "
            "them (tangram.ray.stop_broker) or start the broker with their key "
            "(fencing_key=, or TANGRAM_FENCING_KEY)"
        )
    return started


def _options(
    name: str, namespace: str, node_id: str, max_restarts: int, detached: bool
) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "get_if_exists": True,
        "max_restarts": max_restarts,
        "num_cpus": 0,  # it only waits on children; the cores are the broker's to grant
        "max_concurrency": 1000,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
    }
    if detached:
        opts["lifetime"] = "detached"
    return opts
