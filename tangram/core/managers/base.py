"""The one interface every resource manager implements, and the DP operators.

A manager owns the units of one pool (cores, GPU chunks, API permits). The scheduler
never looks inside: per round it opens a scratch (a cheap tentative copy of the free
state), asks it whether minimum amounts fit, asks it for a DP operator per partition,
then commits the decisions with ``allocate``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from tangram.spec import Action, Allocation, Demand


class Operator(ABC):
    """The topology of one partition's free units, as the allocation DP sees it."""

    @abstractmethod
    def start(self) -> Hashable:
        """The free state before any candidate takes units."""

    @abstractmethod
    def take(self, state: Any, k: int) -> Any | None:
        """The state after one more candidate takes k units, or None when it cannot."""

    @abstractmethod
    def units(self, state: Any) -> int:
        """How many units are free in ``state``."""


class CountOperator(Operator):
    """Interchangeable units: the state is the number of free units."""

    def __init__(self, free: int) -> None:
        self.free = free

    def start(self) -> int:
        return self.free

    def take(self, state: int, k: int) -> int | None:
        return state - k if state >= k else None

    def units(self, state: int) -> int:
        return state


class Scratch(ABC):
    """A tentative copy of a pool's free state for one scheduling round.

    It also tracks FCFS blocking: once an action that needs this pool waits, later
    actions that would compete for the same units wait behind it.
    """

    @abstractmethod
    def fit(self, action: Action, amount: int) -> Hashable | None:
        """Reserve ``amount`` tentatively; return the partition used, or None if it does not fit."""

    @abstractmethod
    def unfit(self, action: Action, amount: int, part: Hashable) -> None:
        """Undo a tentative reservation made by ``fit``."""

    @abstractmethod
    def blocked(self, action: Action) -> bool:
        """Whether an earlier waiting action stands in front of this one here."""

    @abstractmethod
    def block(self, action: Action) -> None:
        """Record that ``action`` waits, so later competitors wait behind it."""

    @property
    @abstractmethod
    def saturated(self) -> bool:
        """Whether no later action can be admitted here this round."""

    @abstractmethod
    def operator(self, part: Hashable, group: set[str]) -> Operator:
        """The DP operator of ``part``: its free state with every tentative reservation
        applied except the key reservations of the actions in ``group``."""

    def partition_of(self, action: Action) -> Hashable | None:
        """The partition a waiting action will use, when it is already known."""
        return None


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric a kind of manager exports beyond the ones every pool has: Prometheus
    name (without ``tangram_``), type, help, and labels besides ``pool``."""

    name: str
    type: str  # counter | gauge
    doc: str
    labels: tuple[str, ...] = ()


class Manager(ABC):
    """One pool of units behind the interface the scheduler uses, and the one interface
    that configuration, metrics, the CLI and drivers see (nothing outside
    tangram/core/managers/ and the kind registry names a concrete manager)."""

    kind: ClassVar[str]
    has_extra_cost: ClassVar[bool] = False  # whether extra_cost can be non-zero
    runs_services: ClassVar[bool] = False  # whether actions name a service to run here
    unit: ClassVar[str] = "units"  # what one unit is called, in plural ("cores", "GPUs")
    # Whether several leases may hold the same units (a GPU instance's request slots);
    # the core then tells the manager each grant's fencing token (``granted``).
    shares_units: ClassVar[bool] = False
    metrics: ClassVar[tuple[MetricFamily, ...]] = ()  # exported by ``samples``

    def __init__(self, name: str) -> None:
        self.name = name
        # Unit-seconds busy and idle per node, integrated up to self._last.
        self.busy_seconds: dict[str, float] = {}
        self.idle_seconds: dict[str, float] = {}
        self._last: float | None = None
        # Actions a time-based limit (rate, window, tokens) held back, once per action.
        self.throttled_total = 0

    # ---- validation -----------------------------------------------------------------
    @abstractmethod
    def feasible(self, action: Action, demand: Demand) -> tuple[int, ...]:
        """The amounts this pool could ever grant for ``demand``, ascending; raise
        InvalidAction with a message that says what would fit when there are none."""

    # ---- a round ----------------------------------------------------------------------
    @abstractmethod
    def begin_round(self, now: float) -> Scratch: ...

    @abstractmethod
    def allocate(
        self, action: Action, amount: int, part: Hashable, now: float
    ) -> Allocation | None:
        """Take exact units; None if they are not there (the caller then defers)."""

    @abstractmethod
    def release(
        self, action: Action, alloc: Allocation, now: float, usage: dict[str, Any] | None
    ) -> None: ...

    @abstractmethod
    def claim(self, action: Action, alloc: Allocation, now: float) -> None:
        """Take exactly the units of ``alloc`` (a lease restored after a restart);
        ValueError if any of them is not free."""

    def rollback(self, action: Action, alloc: Allocation, now: float) -> None:
        """Undo an ``allocate`` of this round whose grant was never published (another
        pool of the same action could not allocate): as if it never happened."""
        self.release(action, alloc, now, None)

    def failed(self, action: Action, alloc: Allocation) -> None:
        """The holder released with outcome "error": forget what the grant assumed would
        happen on the units (a GPU restore that may never have completed)."""

    def serves(self, service: str) -> bool:
        """Whether this pool knows the service (a GPU pool's model)."""
        return False

    def observe(self, what: str, key: str, value: float) -> None:
        """A measurement from an executor that corrects the cost model (a GPU service's
        restore time); ValueError for one this pool does not take."""
        raise ValueError(f"pool {self.name!r} ({self.kind}) takes no {what!r} measurements")

    # ---- what the drivers see -------------------------------------------------------
    def partitions(self) -> list[str]:
        """The nodes of this pool (where executors run); none for a pool without nodes."""
        return [n for n in self.usage() if n]

    def pin_of(self, trajectory: str) -> str | None:
        """The node the trajectory is pinned to between actions, if it is."""
        return None

    def describe(self) -> str:
        """The pool in a few words: ``8 cores on 1 node``."""
        use = self.usage()
        units = sum(c for c, _ in use.values())
        nodes = len(use)
        return f"{units} {self.unit} on {nodes} node{'s' if nodes != 1 else ''}"

    def samples(self, now: float) -> Iterable[tuple[str, tuple[str, ...], float]]:
        """Values of ``metrics`` now: (family name, its extra label values, value)."""
        return ()

    def counters(self) -> dict[str, float]:
        """The pool's accounting beyond the snapshot, by name (for drivers that have no
        Prometheus registry, e.g. a Ray client)."""
        return {}

    def granted(self, alloc: Allocation, token: int) -> None:
        """The lease holding ``alloc`` was granted (or restored) with fencing ``token``
        (called only when ``shares_units``)."""

    def latency_factor(self, action: Action, alloc: Allocation) -> float:
        """How much longer the action runs for sharing its units with others (an engine
        batching concurrent requests); the simulator's model, 1 when nothing is shared."""
        return 1.0

    def held_cost(self, action: Action, alloc: Allocation) -> float:
        """Time a granted action pays on top of its duration (a restore it needed)."""
        return 0.0

    def extra_cost(self, action: Action, amount: int) -> float:
        """Time the action pays on top of its duration with ``amount`` units (GPU restore)."""
        return 0.0

    def ready_at(self, action: Action, amount: int, now: float) -> float | None:
        """When time alone (a refilling quota) could let ``amount`` fit; None if only a
        release can."""
        return None

    def why(self, action: Action, amount: int, now: float) -> dict[str, Any] | None:
        """Why ``amount`` units for the queued ``action`` cannot be had here now, from the
        pool's current free state (read only; nothing is reserved), or None when they
        could. A dict with ``reason`` (``insufficient_units``, ``rate_limited``,
        ``memory``, ...) and ``message`` (words for a person), and any of ``node``,
        ``needs``, ``free``, ``limit`` and ``ready_at`` (the time, on the core's clock,
        at which time alone could let it fit). The default compares the amount with the
        free units of the pool's nodes."""
        free = {n: c - u for n, (c, u) in self.usage().items()}
        if not free or max(free.values()) >= amount:
            return None
        most = max(free.values())
        return {
            "reason": "insufficient_units",
            "message": f"pool {self.name!r} has at most {most} of the {amount} {self.unit} "
            "it needs free on one node",
            "needs": amount,
            "free": most,
        }

    def close_trajectory(self, trajectory: str) -> str | None:
        """Forget what the trajectory holds between actions (pins, reserved memory);
        return the node it was pinned to, if it was (its sandbox directory is there)."""
        return None

    # ---- capacity and accounting ------------------------------------------------------
    @abstractmethod
    def usage(self) -> dict[str, tuple[int, int]]:
        """Per node: (capacity, units in use). A pool without a bounded capacity
        reports capacity 0."""

    def tick(self, now: float) -> None:
        """Integrate busy and idle unit-seconds up to ``now``; call before usage changes."""
        last = self._last
        self._last = now
        if last is None or now <= last:
            return
        dt = now - last
        busy, idle = self.busy_seconds, self.idle_seconds
        for node, (cap, used) in self.usage().items():
            busy[node] = busy.get(node, 0.0) + used * dt
            if cap:
                idle[node] = idle.get(node, 0.0) + (cap - used) * dt

    def topology(self) -> dict[str, Any]:
        return {}

    def snapshot(self) -> dict[str, Any]:
        use = self.usage()
        return {
            "kind": self.kind,
            "capacity": sum(c for c, _ in use.values()),
            "in_use": sum(u for _, u in use.values()),
            "nodes": {n: {"capacity": c, "in_use": u} for n, (c, u) in use.items()},
            "busy_unit_seconds": sum(self.busy_seconds.values()),
            "idle_unit_seconds": sum(self.idle_seconds.values()),
            "topology": self.topology(),
        }
