"""The allocation DP and the waiting-queue estimate of the paper's elastic scheduler.

Candidates (admitted actions sharing one key partition, in FCFS order) each pick an
amount from their feasible set; the DP finds the least total duration for *every prefix*
of the candidate list in one forward pass, because the scheduler's eviction loop drops
candidates from the tail and so only ever needs prefixes.

Two implementations of the same recurrence:
- interchangeable units (CPU cores, quota permits): numpy over "extra units above the
  prefix's minimums", one vectorised step per candidate;
- any other topology (GPU buddy chunks): a dictionary over the operator's states.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tangram.core.managers.base import CountOperator, Operator

INF = math.inf


@dataclass(slots=True)
class Candidate:
    """Feasible amounts on the key partition (ascending) and the cost of each."""

    amounts: tuple[int, ...]
    costs: tuple[float, ...]


class PrefixDP:
    """Optimal allocations of every prefix of the candidate list."""

    def best(self, j: int) -> tuple[float, list[int]]:
        """(least total cost, amounts) for the first j candidates; (inf, []) if they cannot
        all fit even at their minimums."""
        raise NotImplementedError


def solve(cands: Sequence[Candidate], op: Operator) -> PrefixDP:
    if isinstance(op, CountOperator):
        return _CountDP(cands, op.free)
    return _StateDP(cands, op)


class _CountDP(PrefixDP):
    def __init__(self, cands: Sequence[Candidate], free: int) -> None:
        self.cands = cands
        n = len(cands)
        mins = [c.amounts[0] for c in cands]
        # layers[j] = cost of prefix j by extra units used (index), choices[j] = the
        # offset (into the candidate's amounts) chosen for each extra-unit count.
        self.layers: list[np.ndarray] = [np.zeros(1)]
        self.choices: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.n_ok = 0
        base = 0
        absorb = 0  # the most extra units the prefix could use
        prev = self.layers[0]
        for j in range(n):
            c = cands[j]
            base += mins[j]
            slack = free - base
            if slack < 0:
                break
            offs = np.asarray(c.amounts, dtype=np.int64) - mins[j]
            absorb += int(offs[-1])
            length = min(slack, absorb) + 1
            costs = np.asarray(c.costs, dtype=np.float64)
            if len(offs) == 1:
                cur = np.full(length, INF)
                m = min(length, len(prev))
                cur[:m] = prev[:m] + costs[0]
                choice = np.zeros(length, dtype=np.int64)
            else:
                # cur[e] = min_t prev[e - offs[t]] + costs[t]
                pad = int(offs[-1])
                padded = np.full(pad + length, INF)
                m = min(length, len(prev))
                padded[pad : pad + m] = prev[:m]
                idx = (np.arange(length)[:, None] + pad) - offs[None, :]
                mat = padded[idx] + costs[None, :]
                choice = np.argmin(mat, axis=1)
                cur = mat[np.arange(length), choice]
            self.layers.append(cur)
            self.choices.append(choice)
            prev = cur
            self.n_ok = j + 1

    def best(self, j: int) -> tuple[float, list[int]]:
        if j > self.n_ok:
            return INF, []
        layer = self.layers[j]
        e = int(np.argmin(layer))
        total = float(layer[e])
        if not math.isfinite(total):
            return INF, []
        out = [0] * j
        for i in range(j, 0, -1):
            c = self.cands[i - 1]
            t = int(self.choices[i][e])
            out[i - 1] = c.amounts[t]
            e -= c.amounts[t] - c.amounts[0]
        return total, out


class _StateDP(PrefixDP):
    def __init__(self, cands: Sequence[Candidate], op: Operator) -> None:
        self.cands = cands
        start = op.start()
        # per layer: state -> (cost, previous state, amount)
        self.layers: list[dict[Hashable, tuple[float, Any, int]]] = [{start: (0.0, None, 0)}]
        cache: dict[tuple[Hashable, int], Any] = {}
        for c in cands:
            prev = self.layers[-1]
            cur: dict[Hashable, tuple[float, Any, int]] = {}
            for state, (cost, _, _) in prev.items():
                for a, dc in zip(c.amounts, c.costs, strict=True):
                    key = (state, a)
                    if key in cache:
                        nxt = cache[key]
                    else:
                        nxt = cache[key] = op.take(state, a)
                    if nxt is None:
                        continue
                    total = cost + dc
                    old = cur.get(nxt)
                    if old is None or total < old[0]:
                        cur[nxt] = (total, state, a)
            if not cur:
                break
            self.layers.append(cur)

    def best(self, j: int) -> tuple[float, list[int]]:
        if j >= len(self.layers):
            return INF, []
        layer = self.layers[j]
        state = min(layer, key=lambda s: layer[s][0])
        total = layer[state][0]
        out = [0] * j
        for i in range(j, 0, -1):
            _, prev, a = self.layers[i][state]
            out[i - 1] = a
            state = prev
        return total, out


# --------------------------------------------------------------------------- estimate


@dataclass(slots=True)
class Waiting:
    """A waiting action as the estimate sees it: its first feasible amounts and the
    duration of each (the first ``depth`` are tried for the head of the waiting list)."""

    amounts: tuple[int, ...]
    costs: tuple[float, ...]


def waiting_cost(
    busy_until: Sequence[float],
    free_units: int,
    kept: Sequence[tuple[int, float]],
    waiting: Sequence[Waiting],
    depth: int,
) -> float:
    """Sum of projected completion times of ``waiting`` (relative to now), each placed in
    order at its minimum on the earliest-free units of a min-heap of unit free times.

    ``busy_until`` holds one entry per busy unit (when it frees), ``free_units`` the units
    free now, ``kept`` the (amount, duration) of every candidate granted this round. The
    first waiting action may take any of its first ``depth`` amounts, whichever finishes
    first.
    """
    if not waiting:
        return 0.0
    heap = list(busy_until)
    zeros = free_units
    for amount, dur in kept:
        take = min(amount, zeros)
        zeros -= take
        heap.extend([dur] * amount)
        # Units a kept candidate takes beyond the free ones would come from busy units;
        # the DP never does that, so nothing else to model here.
    heap.extend([0.0] * zeros)
    heapq.heapify(heap)
    total = 0.0
    for i, w in enumerate(waiting):
        tries = w.amounts[: max(1, depth)] if i == 0 else w.amounts[:1]
        need = tries[-1]
        if need > len(heap):
            tries = tuple(a for a in tries if a <= len(heap))
            if not tries:
                continue
        smallest = heapq.nsmallest(tries[-1], heap) if len(tries) > 1 else None
        best_end, best_a = INF, tries[0]
        for t_i, a in enumerate(tries):
            if smallest is not None:
                start = smallest[a - 1]
            else:
                start = heapq.nsmallest(a, heap)[-1] if a > 1 else heap[0]
            end = start + w.costs[t_i]
            if end < best_end:
                best_end, best_a = end, a
        for _ in range(best_a):
            heapq.heappop(heap)
        for _ in range(best_a):
            heapq.heappush(heap, best_end)
        total += best_end
    return total
