"""The action formulation: demands, efficiency models, actions, allocations and leases.

These are plain value types shared by the core, the drivers and the adapters. They hold
no behaviour beyond what follows from their own fields (feasible amounts, durations).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# The errors live in tangram/errors.py with the table of how each travels; they are
# re-exported here, where callers have always found them.
from tangram.errors import ActionCancelled as ActionCancelled
from tangram.errors import InvalidAction as InvalidAction
from tangram.errors import LeaseExpired as LeaseExpired
from tangram.errors import LeaseReleased as LeaseReleased
from tangram.errors import QueueFull as QueueFull
from tangram.errors import TangramError as TangramError
from tangram.errors import Unavailable as Unavailable
from tangram.errors import UnknownAction as UnknownAction
from tangram.errors import UnknownLease as UnknownLease

# --------------------------------------------------------------------------- demands


@dataclass(frozen=True, slots=True)
class Demand:
    """The feasible amounts of one pool's units: fixed, a range [min, max], or a set.

    Exactly one shape is used: ``choices`` when given (a sorted set), else the range
    ``min..max`` (``min == max`` for a fixed amount).
    """

    min: int
    max: int
    choices: tuple[int, ...] | None = None

    @staticmethod
    def fixed(n: int) -> Demand:
        return Demand(n, n)

    @staticmethod
    def range(lo: int, hi: int) -> Demand:
        return Demand(lo, hi)

    @staticmethod
    def of_choices(values: list[int] | tuple[int, ...]) -> Demand:
        if not values:
            raise InvalidAction("a demand's choices must not be empty")
        vals = tuple(sorted(set(values)))
        return Demand(vals[0], vals[-1], vals)

    @staticmethod
    def parse(raw: Any, pool: str = "?") -> Demand:
        """Read the wire forms: ``4``, ``{"min": 1, "max": 8}``, ``{"choices": [1, 2, 4]}``,
        ``[1, 2, 4]`` (choices) or ``(lo, hi)`` tuples (a range)."""
        if isinstance(raw, Demand):
            return raw
        if isinstance(raw, bool):
            raise InvalidAction(f"demand for pool {pool!r} must be a number, a range or choices")
        if isinstance(raw, int):
            return Demand.fixed(raw)
        if isinstance(raw, float) and raw.is_integer():
            return Demand.fixed(int(raw))
        if isinstance(raw, tuple) and len(raw) == 2:
            return Demand.range(_as_int(raw[0], pool), _as_int(raw[1], pool))
        if isinstance(raw, list):
            return Demand.of_choices([_as_int(v, pool) for v in raw])
        if isinstance(raw, Mapping):
            if "choices" in raw:
                vals = raw["choices"]
                if not isinstance(vals, (list, tuple)):
                    raise InvalidAction(f"demand for pool {pool!r}: choices must be a list")
                return Demand.of_choices([_as_int(v, pool) for v in vals])
            if "min" in raw or "max" in raw:
                lo = raw.get("min", raw.get("max"))
                hi = raw.get("max", raw.get("min"))
                return Demand.range(_as_int(lo, pool), _as_int(hi, pool))
        raise InvalidAction(
            f"demand for pool {pool!r} is {raw!r}; write a number (4), a range "
            '({"min": 1, "max": 8}) or choices ({"choices": [1, 2, 4, 8]})'
        )

    def check_shape(self, pool: str) -> None:
        """Refuse amounts that make no sense whatever the pool."""
        if self.min <= 0:
            raise InvalidAction(
                f"demand for pool {pool!r} asks for {self.min} units; amounts must be positive "
                "(leave the pool out of the demands if the action does not use it)",
                "bad_demand",
            )
        if self.min > self.max:
            raise InvalidAction(
                f"demand for pool {pool!r} has min {self.min} > max {self.max}; "
                f"write min <= max, for example {{'min': {self.max}, 'max': {self.min}}}",
                "bad_demand",
            )

    def amounts(self) -> tuple[int, ...]:
        """Every feasible amount, ascending."""
        if self.choices is not None:
            return self.choices
        return tuple(range(self.min, self.max + 1))

    def upto(self, limit: int) -> tuple[int, ...]:
        """The feasible amounts no larger than ``limit``, ascending."""
        if self.max <= limit:
            return self.amounts()
        return tuple(a for a in self.amounts() if a <= limit)

    @property
    def elastic(self) -> bool:
        return self.max > self.min

    def to_wire(self) -> Any:
        if self.choices is not None and len(self.choices) > 1:
            return {"choices": list(self.choices)}
        if self.min == self.max:
            return self.min
        return {"min": self.min, "max": self.max}


def _as_int(v: Any, pool: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        raise InvalidAction(f"demand for pool {pool!r}: {v!r} is not a whole number of units")
    return int(v)


# --------------------------------------------------------------------------- efficiency


@dataclass(frozen=True, slots=True)
class Amdahl:
    """Amdahl's law: speed-up on m units is 1 / ((1 - p) + p / m)."""

    parallel_fraction: float

    def check(self) -> None:
        p = self.parallel_fraction
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise InvalidAction(f"efficiency amdahl={p!r}: the parallel fraction must be in [0, 1]")

    def speedup(self, m: int) -> float:
        p = self.parallel_fraction
        return 1.0 / ((1.0 - p) + p / m)

    def speedups(self, m: np.ndarray) -> np.ndarray:
        p = self.parallel_fraction
        return np.asarray(1.0 / ((1.0 - p) + p / m), dtype=np.float64)


@dataclass(frozen=True, slots=True)
class EfficiencyTable:
    """A measured table of parallel efficiency E(m); speed-up on m units is E(m) * m.

    Amounts between entries use the largest listed amount below them and amounts past the
    last entry gain nothing more: a table only vouches for what was measured.
    Amounts below the first entry are taken as perfectly efficient.
    """

    table: tuple[tuple[int, float], ...]

    def check(self) -> None:
        if not self.table:
            raise InvalidAction("efficiency table is empty")
        for m, ef in self.table:
            if m <= 0 or not 0.0 < ef <= 1.0:
                raise InvalidAction(
                    f"efficiency table entry {m}: {ef}: units must be positive and E(m) in (0, 1]"
                )

    def speedup(self, m: int) -> float:
        best = None
        for k, e in self.table:
            if k <= m:
                best = (k, e)
            else:
                break
        if best is None:
            return float(m)
        return best[0] * best[1]

    def speedups(self, m: np.ndarray) -> np.ndarray:
        return np.array([self.speedup(int(x)) for x in m], dtype=np.float64)


Efficiency = Amdahl | EfficiencyTable


def efficiency_to_wire(eff: Efficiency | None) -> dict[str, Any] | None:
    """The wire form ``parse_efficiency`` reads."""
    if eff is None:
        return None
    if isinstance(eff, Amdahl):
        return {"amdahl": eff.parallel_fraction}
    return {"table": {str(m): e for m, e in eff.table}}


def parse_efficiency(raw: Any) -> Efficiency | None:
    if raw is None or isinstance(raw, (Amdahl, EfficiencyTable)):
        return raw
    if isinstance(raw, Mapping):
        if "amdahl" in raw:
            p = raw["amdahl"]
            if isinstance(p, bool) or not isinstance(p, (int, float)):
                raise InvalidAction(
                    f"efficiency amdahl={p!r}: the parallel fraction must be in [0, 1]"
                )
            eff = Amdahl(float(p))
            eff.check()
            return eff
        if "table" in raw and isinstance(raw["table"], Mapping):
            rows: list[tuple[int, float]] = []
            for k, e in raw["table"].items():
                try:
                    m = int(k)
                    ef = float(e)
                except (TypeError, ValueError):
                    raise InvalidAction(
                        f"efficiency table entry {k!r}: {e!r} must map units to a number"
                    ) from None
                rows.append((m, ef))
            table = EfficiencyTable(tuple(sorted(rows)))
            table.check()
            return table
    raise InvalidAction(
        f"efficiency {raw!r} is not understood; write {{'amdahl': 0.95}} or "
        "{'table': {'1': 1.0, '2': 0.97}}"
    )


# --------------------------------------------------------------------------- actions


@dataclass(slots=True, eq=False)
class Action:
    """One atomic use of external resources by one trajectory of one task (RL job).

    ``demands`` maps pool name to the feasible amounts of that pool. ``key`` names the
    pool whose allocation sets the duration; ``duration`` is the execution time at the
    key demand's minimum and ``efficiency`` how it shrinks with more units. ``service``
    names the GPU service to run, ``tokens`` the expected token cost on quota pools with a
    tokens-per-minute limit, ``memory_gb`` the trajectory's declared memory (read at its
    first action on a CPU pool, reserved on its node until the trajectory closes).
    """

    trajectory: str
    demands: dict[str, Demand]
    task: str = "default"
    key: str | None = None
    duration: float | None = None
    efficiency: Efficiency | None = None
    service: str | None = None
    tokens: int | None = None
    memory_gb: float = 0.0
    ttl: float | None = None
    tenant: str | None = None
    idempotency_key: str | None = None  # the HTTP submit's key, kept with the lease
    # A digest of the submitted request: a retry under the same key must match it, also
    # after a restart (the journal keeps it with the key).
    fingerprint: str | None = None
    id: str = ""
    # Filled in by the core.
    submitted_at: float = 0.0
    seq: int = 0

    @staticmethod
    def build(
        trajectory: str,
        demands: Mapping[str, Any],
        *,
        task: str = "default",
        key: str | None = None,
        duration: float | None = None,
        efficiency: Any = None,
        service: str | None = None,
        tokens: int | None = None,
        memory_gb: float = 0.0,
        ttl: float | None = None,
        tenant: str | None = None,
    ) -> Action:
        """Build an action from wire-like values (numbers, dicts, lists)."""
        return Action(
            trajectory=trajectory,
            demands={p: Demand.parse(d, p) for p, d in demands.items()},
            task=task,
            key=key,
            duration=duration,
            efficiency=parse_efficiency(efficiency),
            service=service,
            tokens=tokens,
            memory_gb=memory_gb,
            ttl=ttl,
            tenant=tenant,
        )

    def duration_at(self, amount: int) -> float | None:
        """Execution time on ``amount`` units of the key pool: d(m) = d(min) * S(min) / S(m)."""
        if self.duration is None or self.key is None:
            return self.duration
        lo = self.demands[self.key].min
        if self.efficiency is None or amount == lo:
            return self.duration
        return self.duration * self.efficiency.speedup(lo) / self.efficiency.speedup(amount)

    def durations(self, amounts: tuple[int, ...]) -> np.ndarray:
        """``duration_at`` for each amount, vectorised (the scheduler's hot path)."""
        assert self.duration is not None and self.key is not None
        if self.efficiency is None:
            return np.full(len(amounts), self.duration)
        lo = self.demands[self.key].min
        m = np.asarray(amounts, dtype=np.float64)
        s_lo = self.efficiency.speedup(lo)
        return self.duration * s_lo / self.efficiency.speedups(m)

    @property
    def profiled(self) -> bool:
        """Whether the scheduler may trade units for time on the key pool."""
        return (
            self.key is not None
            and self.duration is not None
            and self.efficiency is not None
            and self.demands[self.key].elastic
        )


# --------------------------------------------------------------------------- leases


class Resident(NamedTuple):
    """One variant of a GPU service resident on one chunk: ``service`` run on ``k`` GPUs
    of ``node`` from GPU ``start``. ``Allocation.evicts`` names those a grant evicts, and
    the service executor drops exactly these (one structured value from the GPU pool to
    the executor, so nothing is spelled out and parsed back)."""

    service: str
    k: int
    node: str
    start: int
    # How deep the evicted instance sleeps: 1 keeps its weights in host RAM, 2 drops
    # them (host RAM is full); 0 leaves it to the executor (host RAM not accounted).
    level: int = 0


class Allocation(NamedTuple):
    """The exact units of one pool given to one lease (a named tuple: made on every
    grant, so cheap to build)."""

    amount: int
    node: str | None = None
    units: tuple[Any, ...] = ()
    restore: bool = False
    evicts: tuple[Resident, ...] = ()
    pinned: bool = False  # this grant pinned the trajectory to ``node`` (CPU pools)
    # Units shared by the actions of one engine instance (GPU request slots): the fencing
    # token of the lease that opened the instance; 0 when the units are this lease's own.
    epoch: int = 0
    # With ``restore``: what the pool expects the restore to take (a wake from host RAM
    # or a reload), the figure the simulator and the metrics charge it.
    restore_seconds: float = 0.0


@dataclass(slots=True, eq=False)
class Lease:
    """A grant: the action may use exactly these units until it releases or expires."""

    id: str
    action: Action
    fencing_token: int
    allocation: dict[str, Allocation]
    granted_at: float
    expires_at: float
    ttl: float
    overhead: float = 0.0
    state: str = "granted"  # granted | released | expired (one word with the HTTP API)
    ended_at: float | None = None
    outcome: str | None = None
    # The broker's signature over what it granted (tangram.executors.SignedGrant) when it
    # has a fencing key; executors refuse calls without it. Renewed by heartbeats.
    grant: Any = None

    @property
    def dop(self) -> int:
        """Degree of parallelism: the amount granted on the key pool (1 without one)."""
        key = self.action.key
        if key is not None and key in self.allocation:
            return self.allocation[key].amount
        return 1

    @property
    def restore(self) -> bool:
        return any(a.restore for a in self.allocation.values())
