"""The quota manager (the paper's basic manager): one pool per external API.

Four independent limits, any subset of them: a concurrency cap (permits held at once),
a quota per sliding time window, a token-bucket request rate, and tokens per minute whose
cost is estimated at grant and corrected at release with the actual usage.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from tangram.core.managers.base import CountOperator, Manager, MetricFamily, Operator, Scratch
from tangram.spec import Action, Allocation, Demand, InvalidAction

_EPS = 1e-9


class _Bucket:
    """A token bucket refilled continuously at ``rate`` per second up to ``capacity``."""

    __slots__ = ("capacity", "last", "level", "rate")

    def __init__(self, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.last: float | None = None

    def refill(self, now: float) -> float:
        if self.last is not None and now > self.last:
            self.level = min(self.capacity, self.level + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now
        return self.level

    def ready_at(self, need: float, now: float) -> float:
        short = need - self.refill(now)
        return now if short <= _EPS else now + short / self.rate


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    """Calls in flight; (calls, seconds) of a sliding window; (per second, burst)."""

    concurrency: int | None
    window: tuple[int, float] | None
    rate: tuple[float, float] | None


class QuotaManager(Manager):
    kind = "quota"
    unit = "permits"
    metrics = (
        MetricFamily(
            "quota_throttled",
            "counter",
            "Actions held back by a quota's rate, window or token limit (once per action).",
        ),
        # One unit per metric name (Prometheus): permits per limit, tokens apart.
        MetricFamily(
            "quota_available_permits", "gauge",
            "Permits a quota pool could grant now, per limit (concurrency, window, rate).",
            ("limit",),
        ),
        MetricFamily(
            "quota_available_tokens", "gauge",
            "Tokens a quota pool's tokens-per-minute bucket holds now.",
        ),
        MetricFamily("quota_tokens_estimated", "counter", "Tokens charged at grant (estimates)."),
        MetricFamily("quota_tokens_used", "counter", "Tokens reported used at release."),
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        *,
        concurrency: int | None = None,
        window_limit: int | None = None,
        window_seconds: float | None = None,
        rate_per_second: float | None = None,
        burst: int | None = None,
        tokens_per_minute: int | None = None,
        default_tokens: int = 0,
    ) -> None:
        super().__init__(name)
        self.concurrency = concurrency
        self.window_limit = window_limit
        self.window_seconds = window_seconds
        self.rate: _Bucket | None = None
        if rate_per_second is not None:
            cap = burst if burst is not None else max(1, math.ceil(rate_per_second))
            self.rate = _Bucket(float(cap), rate_per_second)
        self.tpm: _Bucket | None = None
        if tokens_per_minute is not None:
            self.tpm = _Bucket(float(tokens_per_minute), tokens_per_minute / 60.0)
        self.default_tokens = default_tokens
        self._cap = min((c for c, _ in self._limits()), default=None)  # most per action
        self.in_use = 0
        self._free_slots = list(range(concurrency or 0))[::-1]  # a stack of free slot ids
        self._window: deque[tuple[float, int]] = deque()
        self._window_count = 0
        # Accounting the metrics issue reads: estimated vs actual tokens, throttled rounds.
        self.tokens_estimated_total = 0
        self.tokens_used_total = 0

    # ---- validation -----------------------------------------------------------------
    def _limits(self) -> list[tuple[int, str]]:
        limits = []
        if self.concurrency is not None:
            limits.append((self.concurrency, f"concurrency cap {self.concurrency}"))
        if self.window_limit is not None:
            limits.append(
                (self.window_limit, f"quota {self.window_limit} per {self.window_seconds:g} s")
            )
        if self.rate is not None:
            limits.append((int(self.rate.capacity), f"rate burst {int(self.rate.capacity)}"))
        return limits

    def feasible(self, action: Action, demand: Demand) -> tuple[int, ...]:
        cap = self._cap
        if demand.choices is None and demand.min == demand.max:  # the common case
            amounts: tuple[int, ...] = (demand.min,) if cap is None or demand.min <= cap else ()
        else:
            amounts = tuple(a for a in demand.amounts() if cap is None or a <= cap)
        if not amounts:
            why = min(self._limits())[1]
            raise InvalidAction(
                f"demand for quota pool {self.name!r} asks for at least {demand.min} "
                f"permits but its {why} allows at most {cap} per action"
            )
        if self.tpm is not None:
            cost = self.token_cost(action)
            if cost > self.tpm.capacity:
                raise InvalidAction(
                    f"action expects {cost} tokens but quota pool {self.name!r} allows "
                    f"{int(self.tpm.capacity)} tokens per minute; split the call or lower "
                    "its token estimate"
                )
        return amounts

    def token_cost(self, action: Action) -> int:
        return action.tokens if action.tokens is not None else self.default_tokens

    # ---- time-based limits ----------------------------------------------------------
    def _expire_window(self, now: float) -> None:
        if self.window_seconds is None:
            return
        horizon = now - self.window_seconds
        win = self._window
        while win and win[0][0] <= horizon:
            self._window_count -= win.popleft()[1]

    def ready_at(self, action: Action, amount: int, now: float) -> float | None:
        times: list[float] = []
        if self.window_limit is not None and self.window_seconds is not None:
            self._expire_window(now)
            excess = self._window_count + amount - self.window_limit
            if excess > 0:
                freed = 0
                for t, n in self._window:
                    freed += n
                    if freed >= excess:
                        times.append(t + self.window_seconds)
                        break
        if self.rate is not None:
            times.append(self.rate.ready_at(amount, now))
        if self.tpm is not None:
            times.append(self.tpm.ready_at(self.token_cost(action), now))
        later = [t for t in times if t > now]
        return max(later) if later else None

    def why(self, action: Action, amount: int, now: float) -> dict[str, Any] | None:
        avail = self.available(now)
        if self.concurrency is not None and avail["concurrency"] < amount:
            return {
                "reason": "insufficient_units",
                "message": f"quota pool {self.name!r} has {avail['concurrency']:g} of the "
                f"{amount} permits it needs free (concurrency cap {self.concurrency}); "
                "permits come back as leases end",
                "limit": "concurrency",
                "needs": amount,
                "free": avail["concurrency"],
            }
        short: list[tuple[str, float, float]] = []  # (limit, needs, available)
        if self.window_limit is not None and avail["window"] < amount:
            short.append(("window", amount, avail["window"]))
        if self.rate is not None and avail["rate"] + _EPS < amount:
            short.append(("rate", amount, avail["rate"]))
        cost = self.token_cost(action)
        if self.tpm is not None and avail["tokens"] + _EPS < cost:
            short.append(("tokens", cost, avail["tokens"]))
        if not short:
            return None
        at = self.ready_at(action, amount, now)
        words = {
            "window": f"quota {self.window_limit} per {self.window_seconds or 0:g} s",
            "rate": f"rate {self.rate.rate if self.rate else 0:g}/s",
            "tokens": f"{int(self.tpm.capacity) if self.tpm else 0} tokens per minute",
        }
        limit, needs, has = short[0]
        what = "tokens" if limit == "tokens" else "permits"
        when = f"; it can be admitted in {at - now:.3g} s" if at is not None else ""
        out: dict[str, Any] = {
            "reason": "rate_limited",
            "message": f"quota pool {self.name!r}: its {words[limit]} leaves {has:.4g} of the "
            f"{needs:g} {what} it needs{when}",
            "limit": limit,
            "needs": needs,
            "free": has,
        }
        if at is not None:
            out["ready_at"] = at
        return out

    # ---- a round ----------------------------------------------------------------------
    def begin_round(self, now: float) -> Scratch:
        self._expire_window(now)
        return _QuotaScratch(self, now)

    def allocate(
        self, action: Action, amount: int, part: Hashable, now: float
    ) -> Allocation | None:
        if not self._fits(action, amount, now):
            return None
        self.tick(now)
        self.in_use += amount
        units: tuple[int, ...] = ()
        if self.concurrency is not None:
            units = tuple(self._free_slots.pop() for _ in range(amount))
        if self.window_limit is not None:
            self._window.append((now, amount))
            self._window_count += amount
        if self.rate is not None:
            self.rate.level -= amount
        if self.tpm is not None:
            cost = self.token_cost(action)
            self.tpm.level -= cost
            self.tokens_estimated_total += cost
        return Allocation(amount=amount, node=None, units=units)

    def _fits(self, action: Action, amount: int, now: float) -> bool:
        if self.concurrency is not None and self.in_use + amount > self.concurrency:
            return False
        if self.window_limit is not None:
            self._expire_window(now)
            if self._window_count + amount > self.window_limit:
                return False
        if self.rate is not None and self.rate.refill(now) + _EPS < amount:
            return False
        return not (self.tpm is not None and self.tpm.refill(now) + _EPS < self.token_cost(action))

    def release(
        self, action: Action, alloc: Allocation, now: float, usage: dict[str, Any] | None
    ) -> None:
        self.tick(now)
        self.in_use -= alloc.amount
        if self.concurrency is not None:
            self._free_slots.extend(alloc.units)
        if self.tpm is not None:
            estimate = self.token_cost(action)
            actual = estimate
            if usage and usage.get("tokens") is not None:
                actual = int(usage["tokens"])
            self.tpm.refill(now)
            # The grant charged the estimate; charge the difference now (a debt when the
            # call used more, so later calls wait for it to refill).
            self.tpm.level = min(self.tpm.capacity, self.tpm.level - (actual - estimate))
            self.tokens_used_total += actual

    def claim(self, action: Action, alloc: Allocation, now: float) -> None:
        if self.concurrency is not None:
            if self.in_use + alloc.amount > self.concurrency or any(
                u not in self._free_slots for u in alloc.units
            ):
                raise ValueError(f"slots {list(alloc.units)} of {self.name!r} are not free")
            for u in alloc.units:
                self._free_slots.remove(u)
        self.tick(now)
        self.in_use += alloc.amount
        # Rates and windows refill on their own; the restored lease only holds its permits.

    def rollback(self, action: Action, alloc: Allocation, now: float) -> None:
        self.release(action, alloc, now, None)
        # Give back what the grant charged: the window entry, the rate permits, the tokens.
        if self.window_limit is not None:
            for i in range(len(self._window) - 1, -1, -1):
                if self._window[i] == (now, alloc.amount):
                    del self._window[i]
                    self._window_count -= alloc.amount
                    break
        if self.rate is not None:
            self.rate.level = min(self.rate.capacity, self.rate.level + alloc.amount)
        if self.tpm is not None:
            cost = self.token_cost(action)
            self.tpm.level = min(self.tpm.capacity, self.tpm.level + cost)
            self.tokens_estimated_total -= cost
            self.tokens_used_total -= cost

    # ---- capacity ---------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        return {"": (self.concurrency or 0, self.in_use)}

    def describe(self) -> str:
        return f"{self.concurrency} permits at once" if self.concurrency else ""

    def samples(self, now: float) -> list[tuple[str, tuple[str, ...], float]]:
        out: list[tuple[str, tuple[str, ...], float]] = [
            ("quota_throttled", (), self.throttled_total),
            ("quota_tokens_estimated", (), self.tokens_estimated_total),
            ("quota_tokens_used", (), self.tokens_used_total),
        ]
        for limit, v in self.available(now).items():
            if limit == "tokens":
                out.append(("quota_available_tokens", (), v))
            else:
                out.append(("quota_available_permits", (limit,), v))
        return out

    def counters(self) -> dict[str, float]:
        return {
            "tokens_estimated_total": float(self.tokens_estimated_total),
            "tokens_used_total": float(self.tokens_used_total),
        }

    @property
    def limits(self) -> QuotaLimits:
        """The limits a provider enforces (what the simulator's provider model needs)."""
        window = None
        if self.window_limit is not None and self.window_seconds is not None:
            window = (self.window_limit, self.window_seconds)
        rate = (self.rate.rate, self.rate.capacity) if self.rate is not None else None
        return QuotaLimits(self.concurrency, window, rate)

    def available(self, now: float) -> dict[str, float]:
        """Permits or tokens available now, per limit."""
        out: dict[str, float] = {}
        if self.concurrency is not None:
            out["concurrency"] = self.concurrency - self.in_use
        if self.window_limit is not None:
            self._expire_window(now)
            out["window"] = self.window_limit - self._window_count
        if self.rate is not None:
            out["rate"] = self.rate.refill(now)
        if self.tpm is not None:
            out["tokens"] = self.tpm.refill(now)
        return out

    def topology(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "window": (
                {"limit": self.window_limit, "seconds": self.window_seconds}
                if self.window_limit is not None
                else None
            ),
            "rate_per_second": self.rate.rate if self.rate else None,
            "burst": self.rate.capacity if self.rate else None,
            "tokens_per_minute": self.tpm.capacity if self.tpm else None,
        }


class _QuotaScratch(Scratch):
    """Tentative permits for one round: whole pool, one partition."""

    __slots__ = ("_blocked", "conc", "mgr", "rate", "takes", "tpm", "window")

    def __init__(self, mgr: QuotaManager, now: float) -> None:
        self.mgr = mgr
        inf = math.inf
        self.conc = (mgr.concurrency - mgr.in_use) if mgr.concurrency is not None else inf
        self.window = (
            (mgr.window_limit - mgr._window_count) if mgr.window_limit is not None else inf
        )
        self.rate = mgr.rate.refill(now) + _EPS if mgr.rate is not None else inf
        self.tpm = mgr.tpm.refill(now) + _EPS if mgr.tpm is not None else inf
        self._blocked = False
        self.takes: dict[str, int] = {}

    def fit(self, action: Action, amount: int) -> Hashable | None:
        cost = self.mgr.token_cost(action) if self.mgr.tpm is not None else 0
        if amount > self.conc or amount > self.window or amount > self.rate or cost > self.tpm:
            return None
        self.conc -= amount
        self.window -= amount
        self.rate -= amount
        self.tpm -= cost
        self.takes[action.id] = amount
        return ""

    def unfit(self, action: Action, amount: int, part: Hashable) -> None:
        cost = self.mgr.token_cost(action) if self.mgr.tpm is not None else 0
        self.conc += amount
        self.window += amount
        self.rate += amount
        self.tpm += cost
        self.takes.pop(action.id, None)

    def blocked(self, action: Action) -> bool:
        return self._blocked

    def block(self, action: Action) -> None:
        self._blocked = True

    @property
    def saturated(self) -> bool:
        return self._blocked

    def partition_of(self, action: Action) -> Hashable | None:
        return ""

    def operator(self, part: Hashable, group: set[str]) -> Operator:
        back = sum(n for aid, n in self.takes.items() if aid in group)
        free = min(self.conc, self.window, self.rate) + back
        return CountOperator(int(free) if math.isfinite(free) else 1 << 20)
