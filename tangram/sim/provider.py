"""An external API as its provider sees the calls: the limits it enforces on its side.

Used by the ``naive-api`` baseline (calls go straight to the provider) and, as an
independent check, by the core executor (every quota grant is replayed against the
provider; a refusal there is a quota violation the broker let through).
"""

from __future__ import annotations

from collections import deque

from tangram.config import QuotaPoolConfig
from tangram.core.managers.quota import QuotaManager


class Provider:
    """An API's limits as its provider enforces them: calls in flight and calls per
    window; a call over either is refused (it does not count)."""

    def __init__(self, concurrency: int | None, window: tuple[int, float] | None) -> None:
        self.concurrency = concurrency
        self.window = window
        self.in_flight = 0
        self.calls: deque[float] = deque()

    def admit(self, now: float) -> bool:
        if self.concurrency is not None and self.in_flight >= self.concurrency:
            return False
        if self.window is not None:
            limit, secs = self.window
            while self.calls and self.calls[0] <= now - secs:
                self.calls.popleft()
            if len(self.calls) >= limit:
                return False
            self.calls.append(now)
        self.in_flight += 1
        return True

    @staticmethod
    def of(cfg: QuotaPoolConfig) -> Provider:
        return Provider(
            cfg.concurrency, (cfg.window.limit, cfg.window.seconds) if cfg.window else None
        )

    @staticmethod
    def of_manager(mgr: QuotaManager) -> Provider:
        window = None
        if mgr.window_limit is not None and mgr.window_seconds is not None:
            window = (mgr.window_limit, mgr.window_seconds)
        return Provider(mgr.concurrency, window)

    def done(self) -> None:
        self.in_flight -= 1
