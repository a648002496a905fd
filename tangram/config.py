"""Pool configuration: the YAML format (see docs/configuration.md) and the managers it builds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator

from tangram import kinds
from tangram.core.managers.base import Manager
from tangram.core.policy import Policy, parse_policy
from tangram.kinds import build_pool
from tangram.kinds.base import ConfigError, Strict
from tangram.kinds.cpu import CpuNodeConfig, CpuPoolConfig
from tangram.kinds.gpu import GpuNodeConfig, GpuPoolConfig, ServiceConfig
from tangram.kinds.quota import QuotaPoolConfig, RateConfig, WindowConfig
from tangram.spec import Demand, InvalidAction

# The models of the built-in kinds live with their kinds (tangram.kinds); they are
# named here too, where configuration code looks for them.
__all__ = [
    "Config", "ConfigError", "CpuNodeConfig", "CpuPoolConfig", "GatewayConfig",
    "GatewayModelConfig", "GpuNodeConfig", "GpuPoolConfig", "PoolConfig", "QuotaPoolConfig",
    "RateConfig", "ServerConfig", "ServiceConfig", "Tenant", "TenantConfig", "WindowConfig",
    "build_pool", "default_config", "load_config", "parse_config",
]  # fmt: skip


def _pool_config() -> Any:
    """A pool's configuration: the model of its ``kind``, from the registry."""
    models = tuple(k.model for k in kinds.KINDS.values())
    return Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007


if TYPE_CHECKING:  # the built-in kinds; at run time, every registered one
    PoolConfig = CpuPoolConfig | GpuPoolConfig | QuotaPoolConfig
else:
    PoolConfig = _pool_config()


class TenantConfig(Strict):
    token: str = Field(..., min_length=16, description="the tenant's bearer token")
    max_queued: int | None = Field(None, ge=1, description="bound on queued actions")


class ServerConfig(Strict):
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


class GatewayModelConfig(Strict):
    """One model the OpenAI-compatible gateway serves: the pool its calls lease and
    the OpenAI-compatible server they are forwarded to."""

    pool: str = Field(..., min_length=1, description="the pool every call leases from")
    upstream: str = Field(
        ..., description="base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1"
    )
    demand: Any = Field(1, description="units of the pool per call: 1, {min, max} or [choices]")
    service: str | None = Field(None, description="the GPU pool's service (model) the call uses")
    tokens: int | None = Field(
        None, ge=1, description="tokens to charge at grant (else max_tokens + prompt estimate)"
    )
    api_key: str | None = Field(None, description="bearer token sent upstream (never the tenant's)")
    timeout_seconds: float = Field(
        600.0, gt=0, description="upstream connect/read timeout (between two chunks of a stream)"
    )

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        parts = urllib.parse.urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"upstream {v!r} is not an http(s) URL with a host; write the server's "
                "base URL, e.g. http://127.0.0.1:8001/v1"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"upstream {v!r}: a base URL has no query or fragment")
        try:
            parts.port  # noqa: B018 (raises for a port out of range)
        except ValueError as exc:
            raise ValueError(f"upstream {v!r}: {exc}") from None
        return v.rstrip("/")

    @field_validator("demand")
    @classmethod
    def _demand(cls, v: Any) -> Any:
        try:
            Demand.parse(v, "gateway").check_shape("gateway")
        except InvalidAction as exc:
            raise ValueError(str(exc)) from None
        return v


class GatewayConfig(Strict):
    """The OpenAI-compatible gateway of ``tangram serve`` (docs/http-api.md)."""

    models: dict[str, GatewayModelConfig] = Field(default_factory=dict)
    queue_timeout_seconds: float = Field(
        300.0, gt=0, description="longest wait in the pool's queue; then 429"
    )
    max_hold_seconds: float = Field(
        30.0, ge=0, description="longest an upstream 429's Retry-After holds the call's units"
    )
    max_connections: int = Field(1000, ge=1, description="upstream connections at most")

    def check(self, pools: dict[str, Any]) -> None:
        """ConfigError for a model on a pool that does not exist (or a service that
        its pool does not run)."""
        for name, m in self.models.items():
            where = f"gateway.models.{name}"
            pool = pools.get(m.pool)
            if pool is None:
                raise ConfigError(
                    f"{where}.pool: unknown pool {m.pool!r}; the pools are "
                    f"{', '.join(sorted(pools))}"
                )
            if m.service is not None:
                services = getattr(pool, "services", None)
                if services is None or m.service not in services:
                    raise ConfigError(
                        f"{where}.service: pool {m.pool!r} has no service {m.service!r}"
                    )


_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    token: str = field(repr=False)
    max_queued: int


class Config(Strict):
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
    gateway: GatewayConfig = Field(default_factory=lambda: GatewayConfig.model_validate({}))
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


def _kinds_changed() -> None:
    # A kind registered after import (a plugin, a test) is accepted from now on.
    pools: Any = dict[str, _pool_config()]  # type: ignore[misc]
    Config.model_fields["pools"].annotation = pools
    Config.model_rebuild(force=True)


kinds.on_register(_kinds_changed)


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
    cfg.gateway.check(dict(cfg.pools))
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
