"""``tangram``, the default: elastic parallelism priced by the pool's load.

The paper's scheduler (``paper``) hands an action every unit that shortens it while units
are free, and admits it at its minimum once they are not: on a busy pool the first
actions of a burst take all the units and the later ones crawl on one, so a fixed degree
of parallelism beats it (docs/benchmarks.md). This policy gives units a price instead:

- **Price.** A unit-second held by one action is a unit-second others may wait for. Its
  price rises with the pool's load ``rho`` (actions running or queued there, counted
  once each, over its capacity) as ``lam = price * rho / (1 - rho)**2``: nearly nothing
  on an idle pool, steep near saturation (the shape of a queue's marginal delay). It
  stops rising at ``rho = saturation``: that shape is an open queue's, whose arrivals
  never end, while a pool's queue is a bounded set of trajectories; priced higher, long
  actions on a saturated pool got one unit and set the step.
- **Target.** An elastic action's target amount ``m`` minimises
  ``(w + lam * m) * d(m)``: its own time, weighted, plus the unit-seconds it holds,
  priced. The weight
  ``w = max(1, d(min) / typical) ** boost`` makes actions much longer than the pool's
  typical one (a running geometric mean) count more: they set the RL step's end.
- **Admission.** An elastic action is admitted once ``share`` of its target fits, not at
  its minimum (what made ``paper`` lose): on a busy pool it waits a little for a useful
  amount, like ``fixed:K`` with K chosen by the load. A long action (``w > long``) waits
  for more: ``share * (w / long) ** wait`` of its target.
- **Arrangement.** The admitted actions of a partition share its free units by least
  total priced cost through the paper's DP (tangram.core.arrange), so topology (GPU
  chunks) is respected and no unit goes where it is worth less than its price.
- **Profiles.** An action that declares no duration is given the mean its task took on
  that pool (learned from ended leases, in the broker and the simulator alike).
- **Order.** Bounded shortest-first: a round walks the actions queued ``overdue``
  seconds or longer first, in FCFS order, then the others by expected duration (declared,
  else the mean of their kind, ``expected``), shortest first; actions on pools of GPU
  services keep FCFS among themselves (their pools are the paper's). Durations are
  compared in classes a factor ``grain`` apart (FCFS within a class): what shortest-first
  gains comes from passing actions many times longer, while reordering near-equals only
  shuffles who waits, and delayed the step's longest chain of tool calls. The core keeps
  them sorted as they come and go (tangram.core.state), so a round sorts nothing; an
  action waits behind shorter ones at most ``overdue`` seconds, then by FCFS.

No waiting-queue estimate and no eviction loop: the price stands for the queue, so a
round costs one DP per busy partition. Every constant is a setting
(``tangram:share=0.25,price=0.2,boost=1,long=20,wait=0.5,overdue=5,grain=4,saturation=0.8``);
docs/scheduling.md says how they were chosen and what was tried.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from tangram.core.arrange import Candidate, solve
from tangram.core.entries import Admitted, Entry, by_partition
from tangram.core.policies.base import Policy
from tangram.core.policies.paper import Paper

if TYPE_CHECKING:
    from tangram.core.managers.base import Manager, Scratch
    from tangram.spec import Action, Lease

# Weight of one new duration in a pool's typical one (a running geometric mean).
TYPICAL_WEIGHT = 0.02


class Tangram(Policy):
    """``share``: part of its target an elastic action waits for; ``price``: the price of
    a unit-second at load one half is ``2 * price``; ``boost``: how much more long actions
    weigh; ``long``: the weight beyond which an action waits for more of its target, and
    ``wait`` how much more; ``overdue``: seconds after which a queued action is walked
    in FCFS order, before the others, which are walked shortest first (0: FCFS);
    ``grain``: the factor between classes of expected duration in that walk (1: exact
    durations); ``saturation``: the load past which the price stops rising."""

    name = "tangram"

    def __init__(
        self,
        share: float = 0.25,
        price: float = 0.2,
        boost: float = 1.0,
        long: float = 20.0,
        wait: float = 0.5,
        overdue: float = 5.0,
        grain: float = 4.0,
        saturation: float = 0.8,
    ) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError("tangram: share must be in (0, 1]")
        if min(price, boost, wait) < 0.0 or long < 1.0:
            raise ValueError("tangram: price, boost and wait must be >= 0, long >= 1")
        if not 0.0 <= overdue < math.inf:
            # No bound would let a stream of short actions starve a long one.
            raise ValueError("tangram: overdue must be finite and >= 0 (0: FCFS)")
        if not 1.0 <= grain < math.inf:
            raise ValueError("tangram: grain must be finite and >= 1 (1: exact durations)")
        if not 0.0 < saturation < 1.0:
            raise ValueError("tangram: saturation must be in (0, 1)")
        self.share = share
        self.price = price
        self.boost = boost
        self.long = long
        self.wait = wait
        self.overdue = overdue
        self.grain = grain
        self.saturation = saturation
        self._log_grain = math.log(grain)
        self.pools: Mapping[str, Manager] = {}
        self.queued: Mapping[str, int] = {}
        self.capacity: dict[str, int] = {}
        self.running: dict[str, int] = {}  # leases holding units of each pool
        # pool -> log of the typical duration at the minimum of its elastic actions
        self.typical: dict[str, float] = {}
        # (task, key pool, min, max) -> (runs, mean duration at the minimum) of elastic
        # actions that declared none
        self.profiles: dict[tuple[str, str, int, int], tuple[int, float]] = {}
        # (task, (pool, min, max) per demand) -> (runs, mean seconds held) of the other
        # actions that declared none: their expected duration, for the order
        self.means: dict[tuple[str, tuple[tuple[str, int, int], ...]], tuple[int, float]] = {}
        # The paper's scheduler, for the pools whose actions restore services (GPUs).
        self.paper: Paper | None = None
        self._arrays: dict[tuple[int, ...], np.ndarray] = {}

    def settings(self) -> dict[str, float]:
        return {
            "share": self.share,
            "price": self.price,
            "boost": self.boost,
            "long": self.long,
            "wait": self.wait,
            "overdue": self.overdue,
            "grain": self.grain,
            "saturation": self.saturation,
        }

    def bind(self, pools: Mapping[str, Manager], queued: Mapping[str, int]) -> Tangram:
        bound = type(self)(**self.settings())
        bound.pools = pools
        bound.queued = queued
        # A pool without a bounded capacity (a quota with no concurrency cap) is never
        # loaded: its price stays zero.
        bound.capacity = {p: sum(c for c, _ in m.usage().values()) for p, m in pools.items()}
        bound.running = {p: 0 for p in pools}
        # On a pool of GPU services the cost of an amount is mostly whether a variant of
        # the service is resident, which a price per unit-second does not capture (it
        # lost to the paper's DP on MOPD at low load, docs/scheduling.md): the paper's
        # scheduler arranges those pools, at the minimum and with its queue estimate.
        services = frozenset(p for p, m in pools.items() if m.has_extra_cost)
        if services:
            bound.paper = Paper().bind(pools, queued)
            bound.paper.scope = services
            bound.lookahead = bound.paper.lookahead
        return bound

    # ------------------------------------------------------------------ the price
    def unit_price(self, pool: str) -> float:
        """The price of a unit-second of ``pool`` now (rising until the load reaches
        ``saturation``)."""
        cap = self.capacity.get(pool, 0)
        if cap <= 0 or self.price == 0.0:
            return 0.0
        rho = min(self.saturation, (self.running[pool] + self.queued.get(pool, 0)) / cap)
        return self.price * rho / (1.0 - rho) ** 2

    def weight(self, pool: str, d_min: float) -> float:
        """How much an action of ``d_min`` seconds at its minimum counts on ``pool``."""
        typ = self.typical.get(pool)
        if typ is None or self.boost == 0.0 or d_min <= 0.0:
            return 1.0
        return float(max(1.0, d_min / math.exp(typ)) ** self.boost)

    def costs(self, entry: Entry, pool: str, lam: float, lo: int = 0) -> np.ndarray:
        """The priced cost of each feasible amount of ``entry`` on its key pool, from
        index ``lo``: (weight + lam * m) * d(m)."""
        feasible = entry.feasible[pool]
        m = self._arrays.get(feasible)
        if m is None:  # one array per distinct feasible set, not per action
            m = self._arrays[feasible] = np.asarray(feasible, dtype=np.float64)
        return (entry.weight + lam * m[lo:]) * entry.durations[lo:]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ hooks
    def _delegated(self, pool: str | None) -> bool:
        return self.paper is not None and self.paper.scope is not None and pool in self.paper.scope

    def expected(self, entry: Entry) -> float:
        """The class of its expected duration: the largest power of ``grain`` not above
        it (the duration itself for ``grain`` 1), so that FCFS orders near-equals."""
        d = self._duration(entry)
        if d <= 0.0 or self.grain == 1.0:
            return d
        # (the small term keeps an exact power, such as 4.0, in its own class)
        return float(self.grain ** math.floor(math.log(d) / self._log_grain + 1e-9))

    def _duration(self, entry: Entry) -> float:
        """Declared duration (at the minimum, for an elastic action), else the mean its
        kind was seen to take; 0 for a kind not seen yet (it goes first, and is
        measured soon), and for an action on a pool of GPU services."""
        a = entry.action
        if self.paper is not None and any(self._delegated(p) for p in a.demands):
            # Pools of GPU services keep FCFS among their actions (the paper's scheduler
            # arranges them, its queue estimate in that order): 0 walks them first of the
            # actions not overdue, in FCFS order.
            return 0.0
        if a.duration is not None:
            return a.duration
        pool = a.key
        if pool is not None and a.efficiency is not None and a.demands[pool].elastic:
            prof = self.profiles.get(_profile_key(a, pool))
        else:
            prof = self.means.get(_kind(a))
        return prof[1] if prof is not None else 0.0

    def prepare(self, entry: Entry) -> None:
        a = entry.action
        pool = a.key
        if self._delegated(pool):
            assert self.paper is not None
            self.paper.prepare(entry)
            return
        if pool is None or a.efficiency is None or not a.demands[pool].elastic:
            return
        d_min = a.duration
        known = True
        if d_min is None:  # no declared duration: what its task was seen to take
            prof = self.profiles.get(_profile_key(a, pool))
            if prof is not None:
                d_min = prof[1]
            else:
                # Nothing seen yet: the pool's typical duration, which gives it weight 1.
                # Its target does not depend on the duration then (both terms of the
                # priced cost scale with it), only on its efficiency curve and the price.
                typ = self.typical.get(pool)
                d_min = math.exp(typ) if typ is not None else 1.0
                known = False
        lo = a.demands[pool].min
        m = np.asarray(entry.feasible[pool], dtype=np.float64)
        entry.durations = d_min * a.efficiency.speedup(lo) / a.efficiency.speedups(m)
        # Against the typical duration before this one: weighed once, when queued.
        entry.weight = self.weight(pool, d_min) if known else 1.0
        if known and d_min > 0.0:
            old = self.typical.get(pool)
            x = math.log(d_min)
            self.typical[pool] = x if old is None else old + TYPICAL_WEIGHT * (x - old)

    def key_amount(self, entry: Entry) -> int:
        pool = entry.action.key
        assert pool is not None
        feasible = entry.feasible[pool]
        if entry.durations is None or self._delegated(pool):
            return feasible[0]
        target = feasible[int(np.argmin(self.costs(entry, pool, self.unit_price(pool))))]
        share = self.share
        w = entry.weight
        if w > self.long:
            share = min(1.0, share * (w / self.long) ** self.wait)
        want = share * target
        return next((x for x in feasible if x >= want), feasible[-1])

    def arrange(
        self,
        admitted: list[Admitted],
        waiting: list[Entry],
        scratches: Mapping[str, Scratch],
        now: float,
        deferred: set[str],
    ) -> None:
        if self.paper is not None:
            self.paper.arrange(admitted, waiting, scratches, now, deferred)
        if not any(adm.entry.durations is not None for adm in admitted):
            return  # nothing elastic to arrange (every round of fixed demands)
        groups = by_partition(admitted)
        prices: dict[str, float] = {}
        for (pool, part), members in groups.items():
            if self._delegated(pool) or not any(_elastic_on(m.entry, pool) for m in members):
                continue
            lam = prices.get(pool)
            if lam is None:
                lam = prices[pool] = self.unit_price(pool)
            self._share_out(pool, part, members, scratches[pool], lam)

    def _share_out(
        self, pool: str, part: Hashable, members: list[Admitted], scratch: Scratch, lam: float
    ) -> None:
        """Split the partition's free units among ``members`` by least total priced cost,
        each elastic one at no less than it was admitted at."""
        cands = []
        for m in members:
            entry, got = m.entry, m.amounts[pool]
            if not _elastic_on(entry, pool):
                cands.append(Candidate((got,), (0.0,)))
                continue
            lo = entry.feasible[pool].index(got)
            cands.append(Candidate(entry.feasible[pool][lo:], self.costs(entry, pool, lam, lo)))
        op = scratch.operator(part, {m.entry.action.id for m in members})
        slack = op.units(op.start()) - sum(c.amounts[0] for c in cands)
        if slack <= 0:
            return  # nothing free beyond what admission gave (a cold, crowded round)
        # The DP tracks at most ``slack`` extra units: exact, and small on a busy node.
        cost, amounts = solve(cands, op, slack).best(len(cands))
        if not math.isfinite(cost):
            return  # cannot happen after admission; keep the admission amounts
        for m, x in zip(members, amounts, strict=True):
            m.amounts[pool] = x

    def on_grant(self, lease: Lease) -> None:
        for pool in lease.allocation:
            self.running[pool] += 1
        if self.paper is not None:
            self.paper.on_grant(lease)

    def on_end(self, lease: Lease) -> None:
        running = self.running
        for held in lease.allocation:
            running[held] -= 1
        if self.paper is not None:
            self.paper.on_end(lease)
        a = lease.action
        if a.duration is not None or lease.ended_at is None or lease.outcome != "ok":
            return
        pool = a.key
        if pool is None or a.efficiency is None or not a.demands[pool].elastic:
            # Not elastic: what it held is its kind's expected duration (the order).
            if self.overdue > 0.0:
                kind = _kind(a)
                n, mean = self.means.get(kind, (0, 0.0))
                took = lease.ended_at - lease.granted_at
                self.means[kind] = (n + 1, mean + (took - mean) / (n + 1))
            return
        alloc = lease.allocation.get(pool)
        if alloc is None:
            return
        # An elastic action that declared no duration: what it took is its task's profile
        # on its key pool, back to the duration at the minimum by its efficiency curve.
        run = lease.ended_at - lease.granted_at - self.pools[pool].held_cost(a, alloc)
        if run <= 0.0:
            return
        lo = a.demands[pool].min
        d_min = run * a.efficiency.speedup(alloc.amount) / a.efficiency.speedup(lo)
        key = _profile_key(a, pool)
        n, mean = self.profiles.get(key, (0, 0.0))
        self.profiles[key] = (n + 1, mean + (d_min - mean) / (n + 1))


def _elastic_on(entry: Entry, pool: str) -> bool:
    """Whether the policy may trade units of ``pool`` for the action's time."""
    return entry.durations is not None and entry.action.key == pool


def _kind(a: Action) -> tuple[str, tuple[tuple[str, int, int], ...]]:
    return (a.task, tuple((p, d.min, d.max) for p, d in a.demands.items()))


def _profile_key(a: Action, pool: str) -> tuple[str, str, int, int]:
    d = a.demands[pool]
    return (a.task, pool, d.min, d.max)
