"""The ``cpu`` kind: cores per node, NUMA groups, memory for pinned trajectories."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from tangram.core.managers.cpu import CpuManager, CpuNode
from tangram.kinds.base import ConfigError, Kind, Strict, node_names, unique


class CpuNodeConfig(Strict):
    name: str | None = None
    count: int = Field(1, ge=1, description="replicate this node COUNT times (names get -0, -1...)")
    cores: int | list[int] = Field(..., description="core count, or the exact core ids")
    numa: int | list[list[int]] = Field(1, description="NUMA group count, or the ids per group")
    memory_gb: float = Field(..., ge=0)

    @field_validator("cores")
    @classmethod
    def _cores(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("a node needs at least one core")
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("core ids must be a non-empty list without repeats")
        return v


class CpuPoolConfig(Strict):
    kind: Literal["cpu"]
    nodes: list[CpuNodeConfig] = Field(..., min_length=1)


def build(name: str, cfg: CpuPoolConfig) -> CpuManager:
    nodes: list[CpuNode] = []
    for i, nc in enumerate(cfg.nodes):
        for node_name in node_names(nc.name, f"{name}{i}", nc.count):
            ids = list(range(nc.cores)) if isinstance(nc.cores, int) else list(nc.cores)
            if isinstance(nc.numa, int):
                if nc.numa < 1 or nc.numa > len(ids):
                    raise ConfigError(f"pool {name}: numa must be 1..{len(ids)}")
                # Exactly ``numa`` groups in core order, sizes differing by at most one.
                per, extra = divmod(len(ids), nc.numa)
                groups, at = [], 0
                for g in range(nc.numa):
                    size = per + (1 if g < extra else 0)
                    groups.append(ids[at : at + size])
                    at += size
            else:
                groups = [list(g) for g in nc.numa]
                flat = sorted(c for g in groups for c in g)
                if flat != sorted(ids):
                    raise ConfigError(
                        f"pool {name}, node {node_name}: NUMA groups must cover each core "
                        "id exactly once"
                    )
            nodes.append(CpuNode(node_name, groups, nc.memory_gb))
    unique(name, [n.name for n in nodes])
    return CpuManager(name, nodes)


KIND = Kind("cpu", CpuManager, CpuPoolConfig, build)
