"""Tangram on Ray: the broker as a named detached actor, executors on every node, and a
client for Ray drivers, tasks and actors.

```python
import ray, tangram.ray as tr
ray.init(address="auto")                       # or a local cluster
tr.start_broker(config)                        # once per cluster
client = tr.Client()                           # anywhere: finds the actor by name
                                               # (tr.SyncClient(): the same, blocking)
async with client.lease(action) as lease: ...
result = await client.run(run_tests("tests/"), trajectory="t1")
```
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tangram.config import Config, load_config, parse_config
from tangram.executors.fencing import (
    KEY_ENV,
    MIN_KEY_BYTES,
    FencingError,
    ForgedGrant,
    GrantMismatch,
    StaleLease,
)
from tangram.executors.service import ServiceSpec
from tangram.ray.actor import DEFAULT_DATA_DIR, BrokerActor
from tangram.ray.client import Client
from tangram.ray.execute import ExecutorError
from tangram.ray.executors import (
    FencingKeyMismatch,
    executor_name,
    find_executor,
    start_executors,
)
from tangram.ray.nodes import cpu_pool_from_ray
from tangram.ray.sync import SyncClient
from tangram.ray.transport import DEFAULT_NAME, DEFAULT_NAMESPACE, BrokerNotFound, get_broker

__all__ = [
    "DEFAULT_DATA_DIR",
    "BrokerNotFound",
    "Client",
    "ExecutorError",
    "FencingError",
    "FencingKeyMismatch",
    "ForgedGrant",
    "GrantMismatch",
    "StaleLease",
    "SyncClient",
    "cpu_pool_from_ray",
    "executor_name",
    "find_executor",
    "get_broker",
    "resolve_fencing_key",
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


def resolve_fencing_key(key: bytes | None = None) -> bytes:
    """The key the broker signs grants with and its executors check them with: ``key``,
    else ``$TANGRAM_FENCING_KEY`` (hex), else 32 fresh random bytes."""
    if key is not None:
        return key
    raw = os.environ.get(KEY_ENV, "").strip()
    if not raw:
        return secrets.token_bytes(32)
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        raise ValueError(
            f"{KEY_ENV} must be hex (python -c 'import secrets; print(secrets.token_hex(32))')"
        ) from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"{KEY_ENV} holds {len(key)} bytes; a fencing key needs {MIN_KEY_BYTES} or more"
        )
    return key


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


def _caller_node() -> str | None:
    try:
        node: str = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray Client driver has no node of its own
        return None
    return node


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
    fencing_key: bytes | None = None,
    data_dir: str | None = DEFAULT_DATA_DIR,
    broker_options: Mapping[str, Any] | None = None,
) -> Any:
    """Start the broker as a named async actor and its executors; return the handle.

    ``config`` is a ``Config``, a configuration dict or a YAML path. The actor is detached
    (it outlives this driver) and restarted up to ``max_restarts`` times (-1: always).
    ``data_dir`` is where it journals its leases and queued actions, on the node it runs
    on: a restarted actor restores them from there and clients carry on (docs/ray.md).
    ``{session}`` in it stands for that node's Ray session directory, ``{namespace}``
    and ``{name}`` for the broker's; the default keeps the journal with the Ray cluster.
    ``None``: no journal, a restarted broker starts empty (clients holding leases get
    ``UnknownLease`` and acquire again). With a data directory and no placement of its
    own, the actor prefers the node of the caller (soft node affinity), so a restart
    finds the directory; ``broker_options`` (extra ``ray.remote`` options, e.g.
    ``{"resources": {"tangram_broker": 1}}``) pins it where the directory is, as
    deploy/kuberay does. ``services`` are the GPU services the service executors load;
    ``placement`` maps pool node names to Ray node ids where they differ.
    ``sandbox_isolate=False`` runs sandbox commands without isolation (trusted code
    only; see docs/reliability.md).
    ``fencing_key`` (default: ``$TANGRAM_FENCING_KEY`` in hex, else a random key) signs
    every grant; the executors get it as a constructor argument and refuse calls without
    a valid grant for exactly their units (docs/reliability.md, "Executor fencing").
    Raises ``ValueError`` if a broker of that name already runs (use ``get_broker``),
    ``FencingKeyMismatch`` if executors left by an earlier broker hold another key (the
    new broker actor is killed again when its executors cannot start).
    """
    cfg = _config(config)
    key = resolve_fencing_key(fencing_key)
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
    extra = dict(broker_options or {})
    if data_dir is not None and not {"scheduling_strategy", "resources"} & set(extra):
        node = _caller_node()
        if node is not None:
            # The journal is on one node's disk: a restart elsewhere would not find it.
            # Soft, so that the broker still comes back (empty) if that node is gone.
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    opts.update(extra)
    actor_class: Any = ray.remote(BrokerActor)
    # Constructor arguments: Ray re-runs the constructor of a restarted actor with the
    # same arguments, so a restarted broker signs with the key its executors hold and
    # restores from the same data directory.
    handle = actor_class.options(**opts).remote(
        cfg, name=name, namespace=namespace, fencing_key=key, data_dir=data_dir
    )
    ray.get(handle.ping.remote())
    if not detached:
        _owned.append(handle)
    if executors:
        try:
            started = start_executors(
                cfg,
                broker=name,
                namespace=namespace,
                fencing_key=key,
                services=services,
                placement=placement,
                sandbox_root=sandbox_root,
                sandbox_isolate=sandbox_isolate,
                device_kind=device_kind,
                detached=detached,
            )
        except BaseException:
            # A broker whose executors cannot run its grants must not stay behind to be
            # found by name and reused.
            ray.kill(handle, no_restart=True)
            if handle in _owned:
                _owned.remove(handle)
            raise
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
    executors = []
    for pool, info in pools.items():
        kind = {"cpu": "sandbox", "gpu": "service"}.get(info["kind"])
        if kind is None:
            continue
        for node in info["nodes"]:
            ex = find_executor(name, namespace, kind, pool, node)
            if ex is not None:
                executors.append(ex)
    # Containers and engine processes outlive a killed actor: each executor removes its
    # own first (best effort, bounded: a dead or stuck one is killed all the same).
    if executors:
        calls = [ex.shutdown.remote() for ex in executors]
        ray.wait(calls, num_returns=len(calls), timeout=60)
    for ex in executors:
        ray.kill(ex, no_restart=True)
    ray.kill(handle, no_restart=True)
    _owned.clear()
    return True
