"""``paper``: the paper's elastic scheduler (ARL-Tangram, Algorithm 1), as written.

Admission is FCFS at the minimum (the core's round). Then, per partition that an
admitted elastic action uses (a CPU node, a GPU, a quota pool), a DP over the admitted
actions in FCFS order chooses how many units each gets so that the sum of their
completion times plus an estimate of the waiting queue's is smallest, and the eviction
loop (t = 1..|C_j|) defers candidates from the tail, keeping the prefix whose objective
is least; the head too may be deferred. The estimate places every waiter of the
partition (tool calls and not-yet-pinned trajectories included) at its minimum on the
projected free times of its units, so this policy keeps an index of the running leases.
It is kept for comparison: ``tangram`` (tangram.core.policies.tangram) is the default.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING

from tangram.core.arrange import Candidate, Waiting, solve, waiting_cost
from tangram.core.entries import Admitted, Entry, by_partition
from tangram.core.policies.base import Policy

if TYPE_CHECKING:
    from tangram.core.managers.base import Manager, Scratch
    from tangram.spec import Action, Lease


class Paper(Policy):
    """``depth``: amounts per waiting action the queue estimate weighs; ``lookahead``:
    waiting actions it weighs."""

    name = "paper"

    def __init__(self, depth: int = 2, lookahead: int = 256) -> None:
        if depth < 1 or lookahead < 1:
            raise ValueError("paper: depth and lookahead must be at least 1")
        self.depth = depth
        self.lookahead = lookahead
        self.pools: Mapping[str, Manager] = {}
        # The pools it arranges (None: every pool); ``tangram`` hands it its GPU pools.
        self.scope: frozenset[str] | None = None
        # pool -> lease id -> (node, amount, granted at, expected run time or None)
        self._running: dict[str, dict[str, tuple[str | None, int, float, float | None]]] = {}

    def bind(self, pools: Mapping[str, Manager], queued: Mapping[str, int]) -> Paper:
        bound = type(self)(self.depth, self.lookahead)
        bound.pools = pools
        bound._running = {p: {} for p in pools}
        return bound

    def prepare(self, entry: Entry) -> None:
        action = entry.action
        if not action.profiled:
            return
        # Once per action, so scheduling rounds only read it.
        feasible = entry.feasible[action.key]  # type: ignore[index]
        entry.durations = action.durations(feasible)
        head = tuple(float(x) for x in entry.durations[: self.depth])
        entry.wait = Waiting(feasible[: self.depth], head)

    def on_end(self, lease: Lease) -> None:
        for pool in lease.allocation:
            self._running[pool].pop(lease.id, None)

    def arrange(
        self,
        admitted: list[Admitted],
        waiting: list[Entry],
        scratches: Mapping[str, Scratch],
        now: float,
        deferred: set[str],
    ) -> None:
        # A group is every admitted action using one partition (a CPU node, a GPU or quota
        # pool), in FCFS order: those keyed on it are elastic there, the others hold their
        # admitted amount. Eviction then only ever defers the group's tail.
        groups = by_partition(admitted)
        scope = self.scope
        for (pool, part), members in groups.items():
            if scope is not None and pool not in scope:
                continue
            if any(_elastic_on(m.entry.action, pool) for m in members):
                self._arrange_group(pool, part, members, waiting, scratches[pool], now, deferred)

    def _costs(
        self,
        mgr: Manager,
        adm: Admitted,
        pool: str,
        fallback: float,
        extras: dict[tuple[str | None, tuple[int, ...]], tuple[float, ...]],
    ) -> Candidate:
        entry, a = adm.entry, adm.entry.action
        if _elastic_on(a, pool):
            feas = entry.feasible[pool]
            if entry.durations is None:
                entry.durations = a.durations(feas)
            costs = entry.durations
            if mgr.has_extra_cost:
                key = (a.service, feas)
                extra = extras.get(key)
                if extra is None:
                    extra = extras[key] = tuple(mgr.extra_cost(a, x) for x in feas)
                costs = costs + extra
            return Candidate(feas, costs)
        amount = adm.amounts[pool]
        d = a.duration_at(amount) if a.key == pool else a.duration
        d = d if d is not None else fallback
        return Candidate((amount,), (d + mgr.extra_cost(a, amount),))

    def _waiting(
        self,
        mgr: Manager,
        entry: Entry,
        pool: str,
        fallback: float,
        extras: dict[tuple[str | None, tuple[int, ...]], tuple[float, ...]],
    ) -> Waiting:
        """A waiting action as the estimate sees it: its first ``depth`` amounts and costs.
        ``extras`` caches the pool's extra costs per (service, amounts) for the round."""
        a = entry.action
        if entry.wait is not None and a.key == pool:
            if not mgr.has_extra_cost:
                return entry.wait
            feas, costs = entry.wait.amounts, entry.wait.costs
        else:
            feas = entry.feasible[pool][:1]
            costs = (a.duration if a.duration is not None else fallback,)
        if not mgr.has_extra_cost:
            return Waiting(feas, costs)
        key = (a.service, feas)
        extra = extras.get(key)
        if extra is None:
            extra = extras[key] = tuple(mgr.extra_cost(a, x) for x in feas)
        return Waiting(feas, tuple(c + e for c, e in zip(costs, extra, strict=True)))

    def _arrange_group(
        self,
        pool: str,
        part: Hashable,
        members: list[Admitted],
        waiting: list[Entry],
        scratch: Scratch,
        now: float,
        deferred: set[str],
    ) -> None:
        mgr = self.pools[pool]
        known = [m.entry.action.duration for m in members if m.entry.action.duration is not None]
        fallback = sum(d for d in known if d is not None) / len(known) if known else 1.0
        # The pool's extra costs (GPU restores) per (service, amounts), for this round.
        extras: dict[tuple[str | None, tuple[int, ...]], tuple[float, ...]] = {}
        cands = [self._costs(mgr, m, pool, fallback, extras) for m in members]
        op = scratch.operator(part, {m.entry.action.id for m in members})
        n = len(members)
        free_units = op.units(op.start())
        # Every prefix is weighed (Algorithm 1), the shortest ones with the most spare
        # units: one DP exact for all of them (no prefix can use more extra units than
        # the candidates' spans) costs less than widening a truncated one step by step.
        cap = max(8, min(free_units, sum(c.amounts[-1] - c.amounts[0] for c in cands)))
        dp = solve(cands, op, cap)
        # Units past what every candidate could take change nothing in the estimate (and
        # an unbounded quota would otherwise put a million units in its heap).
        free_units = min(free_units, sum(c.amounts[-1] for c in cands))
        depth = self.depth
        look = self.lookahead
        outside: list[Waiting] = []
        for e in waiting:
            if len(outside) >= look:
                break
            a = e.action
            # Every waiter of the partition's units: those pinned to it, and those that
            # could still be placed on it (not yet pinned, or a pool without partitions).
            if pool in a.demands and scratch.partition_of(a) in (part, None):
                outside.append(self._waiting(mgr, e, pool, fallback, extras))
        tail = [
            m.entry.wait
            if m.entry.wait is not None
            and not mgr.has_extra_cost
            and _elastic_on(m.entry.action, pool)
            else Waiting(c.amounts[:depth], tuple(map(float, c.costs[:depth])))
            for m, c in zip(members, cands, strict=True)
        ]
        busy = self._busy_until(pool, part, now, fallback)

        def objective(j: int) -> tuple[float, list[int]]:
            nonlocal dp, cap
            while not dp.exact(j):
                cap *= 4
                dp = solve(cands, op, cap)
            cost, amounts = dp.best(j)
            if not math.isfinite(cost):
                return math.inf, amounts
            kept = [
                (x, float(c.costs[0 if x == c.amounts[0] else c.amounts.index(x)]))
                for c, x in zip(cands, amounts, strict=False)
            ]
            # Every prefix is weighed over the same actions: the candidates it leaves out
            # and the first ``lookahead`` waiting actions behind them.
            rest = tail[j:] + outside
            return cost + waiting_cost(busy, free_units, kept, rest, depth), amounts

        j = n
        best, amounts = objective(j)
        # Eviction (Algorithm 1, t = 1..|C_j|): every shorter prefix is weighed, and the
        # least objective kept, so any candidate may be deferred, the head too. Only
        # when nothing runs on the partition does the head stay: deferred, it would wait
        # for units that nothing is going to free.
        floor = 1 if not busy else 0
        for t in range(n - 1, floor - 1, -1):
            obj, amts = objective(t)
            if obj < best:
                best, amounts, j = obj, amts, t
        if not math.isfinite(best):
            return  # cannot happen after admission; keep the admission amounts
        for i, m in enumerate(members):
            if i < j:
                m.amounts[pool] = amounts[i]
            else:
                deferred.add(m.entry.action.id)

    def _busy_until(self, pool: str, part: Hashable, now: float, fallback: float) -> list[float]:
        """Projected free times (relative to now) of the partition's busy units."""
        out: list[float] = []
        for node, amount, start, run in self._running[pool].values():
            if part != "" and node != part:
                continue
            end = start + (run if run is not None else fallback) - now
            out.extend([end if end > 0.0 else 0.0] * amount)
        return out

    def on_grant(self, lease: Lease) -> None:
        """Index a live lease per pool with its expected run time (for the estimate)."""
        a = lease.action
        for pool, alloc in lease.allocation.items():
            d = a.duration_at(alloc.amount) if a.key == pool else a.duration
            run = None if d is None else d + self.pools[pool].held_cost(a, alloc)
            self._running[pool][lease.id] = (alloc.node, alloc.amount, lease.granted_at, run)


def _elastic_on(action: Action, pool: str) -> bool:
    """Whether the scheduler may trade units of ``pool`` for the action's time."""
    return action.key == pool and action.profiled
