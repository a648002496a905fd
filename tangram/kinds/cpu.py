"""The ``cpu`` kind: cores per node, NUMA groups, memory for pinned trajectories."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

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


class SandboxConfig(Strict):
    """How the pool's sandbox executors run commands (docs/sandboxes.md)."""

    backend: Literal["bubblewrap", "container"] = Field(
        "bubblewrap",
        description="bubblewrap: a working directory per trajectory on the host's userland; "
        "container: a runc container per trajectory from `image`",
    )
    image: str | None = Field(
        None,
        description="the container backend's image: oci:DIR:TAG, docker-archive:FILE.tar, "
        "containers-storage:NAME or docker://REF",
    )
    network: Literal["none", "host"] = Field(
        "none", description="none: loopback only; host: the host's network (opt in)"
    )
    confine: bool = Field(
        True,
        description="cgroups per action (exact cores, one memory limit, a pids limit); "
        "false runs without them (unsafe for untrusted code)",
    )
    memory_mb: int = Field(4096, ge=1, description="memory of a sandbox, /tmp included")
    max_procs: int = Field(256, ge=1, description="processes and threads of a sandbox")
    max_file_mb: int = Field(1024, ge=1, description="the largest file a command writes")
    tmp_mb: int = Field(1024, ge=1, description="the size of the private /tmp")
    idle_timeout_s: float | None = Field(
        600.0, gt=0, description="a container unused this long is removed (container only)"
    )

    @model_validator(mode="after")
    def _image(self) -> SandboxConfig:
        if self.backend == "container" and not self.image:
            raise ValueError("the container backend needs an image (sandbox.image)")
        if self.backend != "container" and self.image:
            raise ValueError("sandbox.image is for backend: container")
        if self.backend == "container" and not self.confine:
            raise ValueError("the container backend is always confined (drop confine: false)")
        return self


class CpuPoolConfig(Strict):
    kind: Literal["cpu"]
    nodes: list[CpuNodeConfig] = Field(..., min_length=1)
    sandbox: SandboxConfig = Field(default_factory=lambda: SandboxConfig.model_validate({}))


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
