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


class ServiceConfig(Strict):
    memory_gb: float = Field(..., gt=0, description="the model's whole footprint")
    restore_seconds: float = Field(..., ge=0)
    parallelism: list[int] = Field([1], min_length=1)


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
            gnodes.append(GpuNode(node_name, gc.gpus, gc.memory_gb))
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
        services.append(Service(s, sc.memory_gb, sc.restore_seconds, par))
    return GpuManager(name, gnodes, services)


KIND = Kind("gpu", GpuManager, GpuPoolConfig, build)
