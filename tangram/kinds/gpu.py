"""The ``gpu`` kind: GPUs per node in buddy chunks, and the services (models) they run."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tangram.core.managers.gpu import GpuManager, GpuNode, Service
from tangram.kinds.base import ConfigError, Kind, Strict, node_names, unique


class GpuNodeConfig(Strict):
    name: str | None = None
    count: int = Field(1, ge=1)
    gpus: int = Field(8, ge=1)
    memory_gb: float = Field(80.0, gt=0, description="memory per GPU")
    host_memory_gb: float | None = Field(
        None,
        gt=0,
        description="host RAM for sleeping engines' weights (pre-launched instances, "
        "evicted variants); unset: not accounted",
    )


class ServiceConfig(Strict):
    memory_gb: float = Field(..., gt=0, description="the model's whole footprint")
    restore_seconds: float = Field(..., ge=0, description="a wake with weights in host RAM")
    reload_seconds: float | None = Field(
        None,
        ge=0,
        description="a start or wake that loads the weights (a level-2 sleep, or no room "
        "in host RAM); unset: restore_seconds",
    )
    launch: Literal["on-demand", "pre-launched"] = Field(
        "on-demand",
        description="pre-launched: an instance sleeps on every chunk from the start, its "
        "weights reserved in host RAM",
    )
    parallelism: list[int] = Field([1], min_length=1)
    max_concurrency: int = Field(
        1,
        ge=1,
        description="request slots: actions one running instance serves at once (an "
        "engine batches them); 1 gives each action its GPUs alone",
    )
    batching: list[tuple[int, float]] = Field(
        default_factory=list,
        description="the simulator's batching curve: [concurrent actions, latency "
        "multiplier] points, ascending (linear in between; 1.0 at one)",
    )


class GpuPoolConfig(Strict):
    kind: Literal["gpu"]
    nodes: list[GpuNodeConfig] = Field(..., min_length=1)
    services: dict[str, ServiceConfig] = Field(default_factory=dict)


def build(name: str, cfg: GpuPoolConfig) -> GpuManager:
    gnodes: list[GpuNode] = []
    for i, gc in enumerate(cfg.nodes):
        if gc.gpus & (gc.gpus - 1):
            raise ConfigError(f"pool {name}: gpus per node must be a power of two")
        for node_name in node_names(gc.name, f"{name}{i}", gc.count):
            gnodes.append(GpuNode(node_name, gc.gpus, gc.memory_gb, gc.host_memory_gb))
    unique(name, [n.name for n in gnodes])
    largest = max(n.gpus for n in gnodes)
    services = []
    for s, sc in cfg.services.items():
        par = tuple(sorted(set(sc.parallelism)))
        bad = [k for k in par if k < 1 or k & (k - 1) or k > largest]
        if bad:
            raise ConfigError(
                f"pool {name}: service {s} parallelism {bad} is not a GPU chunk size "
                f"(1, 2, 4... up to {largest})"
            )
        curve = tuple((int(n), float(f)) for n, f in sc.batching)
        if any(n < 1 or f <= 0 for n, f in curve) or [n for n, _ in curve] != sorted(
            {n for n, _ in curve}
        ):
            raise ConfigError(
                f"pool {name}: service {s} batching needs [concurrency >= 1, multiplier > 0] "
                f"points with strictly ascending concurrency, got {sc.batching}"
            )
        services.append(
            Service(
                s,
                sc.memory_gb,
                sc.restore_seconds,
                par,
                sc.max_concurrency,
                curve,
                sc.launch,
                sc.reload_seconds,
            )
        )
    mgr = GpuManager(name, gnodes, services)
    for node in gnodes:
        need = mgr.host_reserved[node.name]
        if node.host_memory_gb is not None and need > node.host_memory_gb:
            pre = ", ".join(s.name for s in services if s.launch == "pre-launched")
            raise ConfigError(
                f"pool {name}: node {node.name}'s pre-launched instances ({pre}: one per "
                f"chunk) keep {need:g} GB of weights in host RAM, but host_memory_gb is "
                f"{node.host_memory_gb:g}"
            )
    return mgr


KIND = Kind("gpu", GpuManager, GpuPoolConfig, build)
