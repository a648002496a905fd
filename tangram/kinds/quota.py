"""The ``quota`` kind: an external API's limits (concurrency, window, rate, tokens per
minute)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tangram.core.managers.quota import QuotaManager
from tangram.kinds.base import ConfigError, Kind, Strict


class WindowConfig(Strict):
    limit: int = Field(..., ge=1)
    seconds: float = Field(..., gt=0)


class RateConfig(Strict):
    per_second: float | None = Field(None, gt=0)
    per_minute: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)


class QuotaPoolConfig(Strict):
    kind: Literal["quota"]
    concurrency: int | None = Field(None, ge=1)
    window: WindowConfig | None = None
    rate: RateConfig | None = None
    tokens_per_minute: int | None = Field(None, ge=1)
    default_tokens: int = Field(0, ge=0)


def build(name: str, cfg: QuotaPoolConfig) -> QuotaManager:
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


KIND = Kind("quota", QuotaManager, QuotaPoolConfig, build)
