"""An external API as its provider sees the calls: the limits it enforces on its side.

Used by the ``naive-api`` baseline (calls go straight to the provider) and, as an
independent check, by the core executor (every quota grant is replayed against the
provider; a refusal there is a quota violation the broker let through).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol, runtime_checkable

from tangram.config import QuotaPoolConfig, build_pool
from tangram.core.managers.quota import QuotaLimits


@runtime_checkable
class HasLimits(Protocol):
    """A pool whose limits a provider enforces (a quota pool), seen without its class."""

    @property
    def limits(self) -> QuotaLimits: ...


class Provider:
    """An API's limits as its provider enforces them: calls in flight, calls per sliding
    window and a token-bucket request rate; a call over any is refused (it does not
    count). Tokens per minute are not modelled."""

    def __init__(
        self,
        concurrency: int | None,
        window: tuple[int, float] | None,
        rate: tuple[float, float] | None = None,  # (per second, burst)
    ) -> None:
        self.concurrency = concurrency
        self.window = window
        self.rate = rate
        self.level = rate[1] if rate else 0.0
        self.last: float | None = None
        self.in_flight = 0
        self.calls: deque[float] = deque()

    def _rate_ok(self, now: float) -> bool:
        if self.rate is None:
            return True
        per_s, burst = self.rate
        if self.last is not None and now > self.last:
            self.level = min(burst, self.level + (now - self.last) * per_s)
        self.last = now if self.last is None else max(self.last, now)
        # A little slack: the broker's bucket and this one add the same floats in a
        # different order.
        return self.level >= 1.0 - 1e-6

    def admit(self, now: float) -> bool:
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            return False
        if self.window is not None:
            limit, secs = self.window
            while self.calls and self.calls[0] <= now - secs:
                self.calls.popleft()
            if len(self.calls) >= limit:
                return False
        if not self._rate_ok(now):
            return False
        if self.window is not None:
            self.calls.append(now)
        if self.rate is not None:
            self.level -= 1.0
        self.in_flight += 1
        return True

    @staticmethod
    def of(cfg: QuotaPoolConfig) -> Provider:
        # Built through the broker's own pool: one reading of the limits, not two.
        pool = build_pool("api", cfg)
        assert isinstance(pool, HasLimits)
        return Provider.of_limits(pool.limits)

    @staticmethod
    def of_limits(limits: QuotaLimits) -> Provider:
        return Provider(limits.concurrency, limits.window, limits.rate)

    def done(self) -> None:
        self.in_flight -= 1
