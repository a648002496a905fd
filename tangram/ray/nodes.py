"""Pools built from the Ray cluster itself: one CPU node per Ray node."""

from __future__ import annotations

from typing import Any

from tangram.ray.executors import alive_nodes


def cpu_pool_from_ray(
    *,
    resource: str | None = None,
    cores: int | None = None,
    memory_gb: float | None = None,
) -> dict[str, Any]:
    """A ``kind: cpu`` pool whose nodes are the cluster's alive Ray nodes, named by their
    Ray node id (so executors are placed on them without a placement map).

    ``resource`` keeps only nodes that declare that custom resource (e.g. the sandbox
    nodes, not the head). A node's cores are ids ``0..n-1`` with ``n`` its ``CPU``
    resource (or ``cores``); its memory is Ray's ``memory`` resource (or ``memory_gb``).
    """
    nodes = []
    for n in sorted(alive_nodes(), key=lambda n: str(n["NodeID"])):
        res = n.get("Resources", {})
        if resource is not None and res.get(resource, 0) <= 0:
            continue
        count = cores if cores is not None else int(res.get("CPU", 0))
        if count < 1:
            continue
        mem = memory_gb if memory_gb is not None else round(res.get("memory", 0) / 2**30, 2)
        nodes.append({"name": n["NodeID"], "cores": count, "memory_gb": mem})
    if not nodes:
        which = f"with resource {resource!r} and " if resource else "with "
        raise ValueError(f"no alive Ray node {which}at least one CPU")
    return {"kind": "cpu", "nodes": nodes}
