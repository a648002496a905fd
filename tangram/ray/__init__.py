"""Tangram on Ray: the broker as a named detached actor, executors on every node, and a
client for Ray drivers, tasks and actors.

```python
import ray, tangram.ray as tr
ray.init(address="auto")                       # or a local cluster
tr.start_broker(config)                        # once per cluster
client = tr.Client()                           # anywhere: finds the actor by name
async with client.lease(action) as lease: ...
result = await client.run(run_tests("tests/"), trajectory="t1")
```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray

from tangram.config import Config, load_config, parse_config
from tangram.executors.fencing import StaleLease
from tangram.executors.service import ServiceSpec
from tangram.ray.actor import BrokerActor
from tangram.ray.client import (
    DEFAULT_NAME,
    DEFAULT_NAMESPACE,
    BrokerNotFound,
    Client,
    ExecutorError,
    get_broker,
)
from tangram.ray.executors import executor_name, find_executor, start_executors
from tangram.ray.nodes import cpu_pool_from_ray

__all__ = [
    "BrokerNotFound",
    "Client",
    "ExecutorError",
    "StaleLease",
    "cpu_pool_from_ray",
    "executor_name",
    "find_executor",
    "get_broker",
    "start_broker",
    "stop_broker",
]


# Handles of actors this process started without ``detached``: Ray ends an actor that is
# not detached once its creator holds no handle to it, so they are kept here.
_owned: list[Any] = []


def _config(config: Config | Mapping[str, Any] | str | Path) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, (str, Path)):
        return load_config(config)
    return parse_config(dict(config))


def ensure_ray(address: str | None = None, **init: Any) -> None:
    """Join the running cluster (``address="auto"``) or start a local one."""
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, **init)
        return
    try:
        ray.init(address="auto", **init)
    except ConnectionError:
        ray.init(include_dashboard=False, **init)


def start_broker(
    config: Config | Mapping[str, Any] | str | Path,
    *,
    name: str = DEFAULT_NAME,
    namespace: str = DEFAULT_NAMESPACE,
    max_restarts: int = -1,
    detached: bool = True,
    executors: bool = True,
    services: Iterable[ServiceSpec] = (),
    placement: Mapping[str, str] | None = None,
    sandbox_root: str | None = None,
    sandbox_isolate: bool = True,
    device_kind: str = "cpu",
    address: str | None = None,
) -> Any:
    """Start the broker as a named async actor and its executors; return the handle.

    ``config`` is a ``Config``, a configuration dict or a YAML path. The actor is detached
    (it outlives this driver) and restarted up to ``max_restarts`` times (-1: always);
    a restarted broker starts empty, so clients holding leases get ``UnknownLease`` and
    acquire again. ``services`` are the GPU services the service executors load;
    ``placement`` maps pool node names to Ray node ids where they differ.
    ``sandbox_isolate=False`` runs sandbox commands without isolation (trusted code
    only; see docs/reliability.md).
    Raises ``ValueError`` if a broker of that name already runs (use ``get_broker``).
    """
    cfg = _config(config)
    if device_kind not in ("cpu", "cuda"):
        raise ValueError(f"device_kind must be 'cpu' or 'cuda', got {device_kind!r}")
    ensure_ray(address)
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        pass  # no broker of that name yet: good
    else:
        raise ValueError(
            f"a Tangram broker named {name!r} already runs in namespace {namespace!r}; "
            "use tangram.ray.get_broker() or stop_broker() first"
        )
    opts: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "max_restarts": max_restarts,
        "num_cpus": 0,  # it schedules; it does not compute
        "max_concurrency": 10_000,  # long polls of many clients wait here at once
    }
    if detached:
        opts["lifetime"] = "detached"
    actor_class: Any = ray.remote(BrokerActor)
    handle = actor_class.options(**opts).remote(cfg, name=name, namespace=namespace)
    ray.get(handle.ping.remote())
    if not detached:
        _owned.append(handle)
    if executors:
        started = start_executors(
            cfg,
            broker=name,
            namespace=namespace,
            services=services,
            placement=placement,
            sandbox_root=sandbox_root,
            sandbox_isolate=sandbox_isolate,
            device_kind=device_kind,
            detached=detached,
        )
        if not detached:
            _owned.extend(started)
    return handle


def stop_broker(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Kill the broker actor and its executors; False if there was no broker."""
    try:
        handle: Any = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    pools: dict[str, dict[str, Any]] = ray.get(handle.describe.remote())
    for pool, info in pools.items():
        kind = {"cpu": "sandbox", "gpu": "service"}.get(info["kind"])
        if kind is None:
            continue
        for node in info["nodes"]:
            ex = find_executor(name, namespace, kind, pool, node)
            if ex is not None:
                ray.kill(ex, no_restart=True)
    ray.kill(handle, no_restart=True)
    _owned.clear()
    return True
