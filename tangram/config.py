"""Pool configuration: the YAML format (see docs/configuration.md) and the managers it builds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from tangram.core.managers.base import Manager
from tangram.core.managers.cpu import CpuManager, CpuNode
from tangram.core.managers.gpu import GpuManager, GpuNode, Service
from tangram.core.managers.quota import QuotaManager
from tangram.core.policy import Policy, parse_policy


class ConfigError(ValueError):
    """The configuration file is malformed; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CpuNodeConfig(_Strict):
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


class CpuPoolConfig(_Strict):
    kind: Literal["cpu"]
    nodes: list[CpuNodeConfig] = Field(..., min_length=1)


class GpuNodeConfig(_Strict):
    name: str | None = None
    count: int = Field(1, ge=1)
    gpus: int = Field(8, ge=1)
    memory_gb: float = Field(80.0, gt=0, description="memory per GPU")


class ServiceConfig(_Strict):
    memory_gb: float = Field(..., gt=0, description="the model's whole footprint")
    restore_seconds: float = Field(..., ge=0)
    parallelism: list[int] = Field([1], min_length=1)


class GpuPoolConfig(_Strict):
    kind: Literal["gpu"]
    nodes: list[GpuNodeConfig] = Field(..., min_length=1)
    services: dict[str, ServiceConfig] = Field(default_factory=dict)


class WindowConfig(_Strict):
    limit: int = Field(..., ge=1)
    seconds: float = Field(..., gt=0)


class RateConfig(_Strict):
    per_second: float | None = Field(None, gt=0)
    per_minute: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)


class QuotaPoolConfig(_Strict):
    kind: Literal["quota"]
    concurrency: int | None = Field(None, ge=1)
    window: WindowConfig | None = None
    rate: RateConfig | None = None
    tokens_per_minute: int | None = Field(None, ge=1)
    default_tokens: int = Field(0, ge=0)


PoolConfig = Annotated[CpuPoolConfig | GpuPoolConfig | QuotaPoolConfig, Field(discriminator="kind")]


class TenantConfig(_Strict):
    token: str = Field(..., min_length=16, description="the tenant's bearer token")
    max_queued: int | None = Field(None, ge=1, description="bound on queued actions")


class ServerConfig(_Strict):
    """Settings of ``tangram serve`` (the HTTP lease API); the in-process broker ignores them."""

    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    tokens_file: str | None = Field(None, description="lines of TENANT TOKEN [MAX_QUEUED]")
    max_queued: int = Field(10_000, ge=1, description="default bound on queued actions per tenant")
    max_wait_seconds: float = Field(60.0, gt=0, le=3600, description="longest long poll")
    retry_after_seconds: int = Field(1, ge=1, description="Retry-After sent with 429")
    max_body_bytes: int = Field(
        1_048_576, ge=1, description="largest request body; a larger one is answered 413"
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="time a request has to arrive whole (head and body) from its first byte, "
        "or a new connection's first request from the connection opening; then the "
        "connection is closed",
    )
    max_connections: int = Field(
        10_000,
        ge=1,
        description="open connections at most; at the cap the longest-idle one is closed "
        "for a new one (lowered when the open-file limit cannot hold this many)",
    )

    def load_tenants(self, base: Path | None = None) -> dict[str, Tenant]:
        """The tenants of ``tenants`` and of ``tokens_file`` (relative to ``base``), checked:
        names and tokens must be unique, since a token alone names its tenant."""
        out = {
            name: Tenant(name, t.token, t.max_queued or self.max_queued)
            for name, t in self.tenants.items()
        }
        if self.tokens_file is not None:
            path = Path(self.tokens_file)
            if base is not None and not path.is_absolute():
                path = base / path
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigError(f"server.tokens_file: cannot read {path}: {exc}") from None
            for n, line in enumerate(text.splitlines(), 1):
                fields = line.split("#", 1)[0].split()
                if not fields:
                    continue
                if len(fields) not in (2, 3) or (len(fields) == 3 and not fields[2].isdigit()):
                    raise ConfigError(
                        f"{path}:{n}: write TENANT TOKEN [MAX_QUEUED], got {len(fields)} fields"
                    )
                name, token = fields[0], fields[1]
                if len(token) < 16:
                    raise ConfigError(f"{path}:{n}: tenant {name}'s token is under 16 characters")
                if name in out:
                    raise ConfigError(f"{path}:{n}: tenant {name} is listed twice")
                bound = int(fields[2]) if len(fields) == 3 else self.max_queued
                out[name] = Tenant(name, token, max(1, bound))
        for name in out:
            # The server namespaces trajectories as TENANT/ID: a "/" would let two
            # tenants' trajectories collide.
            if not _TENANT_NAME.fullmatch(name):
                raise ConfigError(
                    f"server: tenant name {name!r} must be letters, digits, '.', '_' or '-'"
                )
        tokens = [t.token for t in out.values()]
        if len(set(tokens)) != len(tokens):
            raise ConfigError("server: two tenants share a token; each needs its own")
        return out


_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    token: str = field(repr=False)
    max_queued: int


class Config(_Strict):
    policy: str = "tangram"
    lease_ttl_seconds: float = Field(60.0, gt=0)
    max_queued_per_pool: int = Field(100_000, ge=1)
    # A trajectory with nothing queued or held this long is closed as if its client had
    # closed it (frameworks without an end-of-trajectory hook never close); null: never.
    trajectory_idle_seconds: float | None = Field(600.0, gt=0)
    # With a data directory: "normal" survives a crash of the broker process, "full"
    # also a crash of the machine (an fsync per commit).
    durability: Literal["normal", "full"] = "normal"
    pools: dict[str, PoolConfig] = Field(..., min_length=1)
    server: ServerConfig = Field(default_factory=lambda: ServerConfig.model_validate({}))
    # Where the file was read from: ``server.tokens_file`` is relative to it.
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The file this configuration was loaded from (None when built in memory)."""
        return self._source

    def tenants(self) -> dict[str, Tenant]:
        """The HTTP API's tenants (``server.tenants`` and ``server.tokens_file``)."""
        base = self._source.parent if self._source is not None else None
        return self.server.load_tenants(base)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        parse_policy(v)
        return v

    def build_policy(self) -> Policy:
        return parse_policy(self.policy)

    def build_pools(self) -> dict[str, Manager]:
        return {name: build_pool(name, p) for name, p in self.pools.items()}


def _node_names(base: str | None, default: str, count: int) -> list[str]:
    root = base or default
    return [root] if count == 1 else [f"{root}-{i}" for i in range(count)]


def build_pool(name: str, cfg: CpuPoolConfig | GpuPoolConfig | QuotaPoolConfig) -> Manager:
    if isinstance(cfg, CpuPoolConfig):
        nodes: list[CpuNode] = []
        for i, nc in enumerate(cfg.nodes):
            for node_name in _node_names(nc.name, f"{name}{i}", nc.count):
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
        _unique(name, [n.name for n in nodes])
        return CpuManager(name, nodes)
    if isinstance(cfg, GpuPoolConfig):
        gnodes: list[GpuNode] = []
        for i, gc in enumerate(cfg.nodes):
            if gc.gpus & (gc.gpus - 1):
                raise ConfigError(f"pool {name}: gpus per node must be a power of two")
            for node_name in _node_names(gc.name, f"{name}{i}", gc.count):
                gnodes.append(GpuNode(node_name, gc.gpus, gc.memory_gb))
        _unique(name, [n.name for n in gnodes])
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
    rate = None
    burst = None
    if cfg.rate is not None:
        if (cfg.rate.per_second is None) == (cfg.rate.per_minute is None):
            raise ConfigError(f"pool {name}: rate needs exactly one of per_second, per_minute")
        rate = cfg.rate.per_second or (cfg.rate.per_minute or 0) / 60.0
        burst = cfg.rate.burst
    return QuotaManager(
        name,
        concurrency=cfg.concurrency,
        window_limit=cfg.window.limit if cfg.window else None,
        window_seconds=cfg.window.seconds if cfg.window else None,
        rate_per_second=rate,
        burst=burst,
        tokens_per_minute=cfg.tokens_per_minute,
        default_tokens=cfg.default_tokens,
    )


def _unique(pool: str, names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise ConfigError(f"pool {pool}: node names must be unique, got {names}")


def parse_config(data: Any) -> Config:
    """Validate a configuration, its structure included (node names, NUMA groups, GPU
    sizes, rates), so that a configuration that loads also builds."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"{where}: {err['msg']}")
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    cfg.build_pools()  # raises ConfigError for what the schema alone cannot see
    return cfg


def load_config(path: str | Path) -> Config:
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    cfg = parse_config(data)
    cfg._source = Path(path)
    return cfg


def default_config() -> Config:
    """Embedded defaults that work on a laptop: this machine's cores and memory as one
    CPU node, and an example API quota pool."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        mem = 8.0
    data: dict[str, Any] = {
        "pools": {
            "cpu": {
                "kind": "cpu",
                "nodes": [
                    {
                        "name": "local",
                        "cores": sorted(os.sched_getaffinity(0))
                        if hasattr(os, "sched_getaffinity")
                        else (cores or 1),
                        "memory_gb": mem,
                    }
                ],
            },
            "api": {
                "kind": "quota",
                "concurrency": 16,
                "rate": {"per_minute": 600, "burst": 10},
            },
        }
    }
    gpus = detect_gpus()
    if gpus is not None:
        data["pools"]["gpu"] = {"kind": "gpu", "nodes": [{"name": "local", **gpus}]}
    return parse_config(data)


def detect_gpus() -> dict[str, Any] | None:
    """This machine's NVIDIA GPUs as a GPU node (``gpus``, ``memory_gb`` per GPU), from
    ``nvidia-smi``; None when there are none or it cannot say. GPU pools hand out
    power-of-two chunks, so a machine with 6 GPUs offers 4."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        mib = [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if not mib:
        return None
    count = 1 << (len(mib).bit_length() - 1)
    return {"gpus": count, "memory_gb": round(min(mib) / 1024, 1)}
