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
import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tangram.core.managers.base import CountOperator, Operator

INF = math.inf


@dataclass(slots=True)
class Candidate:
    """Feasible amounts on the key partition (ascending) and the cost of each."""

    amounts: tuple[int, ...]
    costs: Sequence[float] | np.ndarray  # aligned with amounts


class PrefixDP:
    """Optimal allocations of every prefix of the candidate list."""

    def exact(self, j: int) -> bool:
        """Whether ``best(j)`` is exact (a truncated DP may need widening first)."""
        return True

    def best(self, j: int) -> tuple[float, list[int]]:
        """(least total cost, amounts) for the first j candidates; (inf, []) if they cannot
        all fit even at their minimums."""
        raise NotImplementedError


def solve(cands: Sequence[Candidate], op: Operator, cap: int | None = None) -> PrefixDP:
    """One forward pass over prefixes. ``cap`` bounds the extra units (above the
    minimums) tracked for count operators: ``best(j)`` stays exact for every prefix whose
    slack is within the cap, because a layer's entry for e extra units depends only on
    the previous layer's entries for at most e."""
    if isinstance(op, CountOperator):
        if sum(c.amounts[-1] for c in cands) <= op.free:
            return _Uncontended(cands)
        if cap is not None and cap <= SCAN_MAX_CAP and len(cands) >= SCAN_MIN_CANDIDATES:
            return _ScanDP(cands, op.free, cap)
        return _CountDP(cands, op.free, cap)
    return _StateDP(cands, op, cap)


# The scan does log2(n) vectorised steps of n * (cap + 1)**2 cells, the layered pass n
# small steps: the scan wins for many candidates sharing few spare units.
SCAN_MAX_CAP = 16
SCAN_MIN_CANDIDATES = 24


class _Uncontended(PrefixDP):
    """Every candidate can take its largest amount at once: nothing to share, so each
    simply takes its own cheapest amount (an unbounded quota pool, a near-empty node)."""

    def __init__(self, cands: Sequence[Candidate]) -> None:
        self.cands = cands
        self.picks = [int(np.argmin(np.asarray(c.costs, dtype=np.float64))) for c in cands]
        self.prefix = np.cumsum([float(c.costs[t]) for c, t in zip(cands, self.picks, strict=True)])

    def best(self, j: int) -> tuple[float, list[int]]:
        if j == 0:
            return 0.0, []
        amounts = [c.amounts[t] for c, t in zip(self.cands[:j], self.picks[:j], strict=True)]
        return float(self.prefix[j - 1]), amounts


class _CountDP(PrefixDP):
    def __init__(self, cands: Sequence[Candidate], free: int, cap: int | None) -> None:
        self.cands = cands
        self.cap = cap if cap is not None else free
        # layers[j] = least cost of prefix j by extra units used; choices[j] = index into
        # candidate j's amounts chosen for each extra-unit count.
        self.layers: list[np.ndarray] = [np.zeros(1)]
        self.choices: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.slack: list[int] = [free]
        self.absorb: list[int] = [0]
        base = 0
        absorb = 0  # the most extra units the prefix could use
        prev = self.layers[0]
        for c in cands:
            lo = c.amounts[0]
            base += lo
            slack = free - base
            if slack < 0:
                break
            absorb += c.amounts[-1] - lo
            length = min(slack, absorb, self.cap) + 1
            costs = c.costs if isinstance(c.costs, np.ndarray) else np.asarray(c.costs, float)
            m = min(length, len(prev))
            if len(c.amounts) == 1 or length == 1:
                cur = np.full(length, INF)
                cur[:m] = prev[:m] + costs[0]
                choice = _ZEROS[:length] if length <= len(_ZEROS) else np.zeros(length, int)
            else:
                offs = _offsets(c.amounts)
                k = int(np.searchsorted(offs, length - 1, side="right"))  # usable amounts
                offs, costs = offs[:k], costs[:k]
                pad = int(offs[-1])
                padded = np.full(pad + length, INF)
                padded[pad : pad + m] = prev[:m]
                # cur[e] = min over t of prev[e - offs[t]] + costs[t]
                mat = padded[_index(offs, length)] + costs
                choice = np.argmin(mat, axis=1)
                cur = mat[_ROWS[:length] if length <= len(_ROWS) else np.arange(length), choice]
            self.layers.append(cur)
            self.choices.append(choice)
            self.slack.append(slack)
            self.absorb.append(absorb)
            prev = cur

    def exact(self, j: int) -> bool:
        return j >= len(self.layers) or min(self.slack[j], self.absorb[j]) <= self.cap

    def best(self, j: int) -> tuple[float, list[int]]:
        if j >= len(self.layers):
            return INF, []
        layer = self.layers[j]
        e = int(np.argmin(layer))
        total = float(layer[e])
        if not math.isfinite(total):
            return INF, []
        out = [c.amounts[0] for c in self.cands[:j]]
        i = j
        while e > 0:  # the rest take their minimum
            c = self.cands[i - 1]
            t = int(self.choices[i][e])
            out[i - 1] = c.amounts[t]
            e -= c.amounts[t] - c.amounts[0]
            i -= 1
        return total, out


class _ScanDP(PrefixDP):
    """All prefixes at once by a parallel prefix scan (Hillis-Steele) of min-plus
    convolutions: row j-1 of ``self.prefix`` holds the least cost of the first j
    candidates by extra units used (0..cap)."""

    def __init__(self, cands: Sequence[Candidate], free: int, cap: int) -> None:
        mins = np.fromiter((c.amounts[0] for c in cands), dtype=np.int64, count=len(cands))
        slack = free - np.cumsum(mins)
        n = int(np.count_nonzero(slack >= 0))  # slack only shrinks along the prefix
        self.cands = cands[:n]
        self.cap = cap
        self.slack = slack[:n]
        w = cap + 1
        own = np.full((n, w), INF)  # own[i, x]: candidate i with x extra units
        spans = np.zeros(n, dtype=np.int64)
        # Candidates with the same feasible amounts fill their rows in one step.
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(self.cands):
            shapes.setdefault(c.amounts, []).append(i)
        for amounts, rows in shapes.items():
            offs = _offsets(amounts)
            k = int(np.searchsorted(offs, cap, side="right"))
            costs = np.array([self.cands[i].costs[:k] for i in rows], dtype=np.float64)
            own[np.ix_(np.asarray(rows, dtype=np.int64), offs[:k])] = costs
            spans[rows] = offs[-1]
        self.absorb = np.cumsum(spans)
        self.own = own
        gather = (w - 1) + np.arange(w)[:, None] - np.arange(w)[None, :]
        acc = own.copy()
        step = 1
        while step < n:
            left, right = acc[:-step], acc[step:]
            padded = np.concatenate([np.full((n - step, w - 1), INF), left], axis=1)
            acc = np.concatenate([acc[:step], (padded[:, gather] + right[:, None, :]).min(axis=2)])
            step *= 2
        self.prefix = acc

    def exact(self, j: int) -> bool:
        if j == 0 or j > len(self.cands):
            return True
        return min(int(self.slack[j - 1]), int(self.absorb[j - 1])) <= self.cap

    def best(self, j: int) -> tuple[float, list[int]]:
        if j > len(self.cands):
            return INF, []
        out = [c.amounts[0] for c in self.cands[:j]]
        if j == 0:
            return 0.0, out
        row = self.prefix[j - 1][: min(int(self.slack[j - 1]), self.cap) + 1]
        e = int(np.argmin(row))
        total = float(row[e])
        if not math.isfinite(total):
            return INF, []
        # Walk back: find the last candidate (below the one placed before) whose best
        # share of the e extra units is not zero, all at once per placement; everyone in
        # between takes their minimum. At most ``cap`` placements.
        top = j - 1  # 0-based index of the highest candidate not yet decided
        while e > 0:
            if top == 0:
                out[0] += e
                break
            pred = self.prefix[:top, e::-1]  # pred[k - 1, x] = prefix[k - 1][e - x]
            vals = pred + self.own[1 : top + 1, : e + 1]
            xs = np.argmin(vals, axis=1)  # ties go to x = 0 (the minimum)
            moved = np.flatnonzero(xs)
            if len(moved) == 0:
                out[0] += e  # only the first candidate can have taken them
                break
            k = int(moved[-1]) + 1
            x = int(xs[k - 1])
            out[k] += x
            e -= x
            top = k - 1
        return total, out


_ZEROS = np.zeros(1025, dtype=np.int64)
_ROWS = np.arange(1025)
_OFFSETS: dict[tuple[int, ...], np.ndarray] = {}
_INDEX: dict[tuple[int, int], np.ndarray] = {}


def _offsets(amounts: tuple[int, ...]) -> np.ndarray:
    got = _OFFSETS.get(amounts)
    if got is None:
        if len(_OFFSETS) > 4096:
            _OFFSETS.clear()
        got = _OFFSETS[amounts] = np.asarray(amounts, dtype=np.int64) - amounts[0]
    return got


def _index(offs: np.ndarray, length: int) -> np.ndarray:
    """Gather indices into the padded previous layer: row e, column t -> e + pad - offs[t].

    Ranges (offsets 0..k-1) are by far the most common shape, so their matrices are kept."""
    k = len(offs)
    contiguous = int(offs[-1]) == k - 1
    if contiguous:
        got = _INDEX.get((k, length))
        if got is not None:
            return got
    got = np.asarray((np.arange(length)[:, None] + int(offs[-1])) - offs[None, :])
    if contiguous:
        if len(_INDEX) > 4096:
            _INDEX.clear()
        _INDEX[(k, length)] = got
    return got


class _StateDP(PrefixDP):
    """Layers of operator states. With a cap, states whose extra units (used beyond the
    prefix's minimums) exceed it are dropped: extras only grow along a path, so every
    prefix whose slack is within the cap keeps all the states it needs."""

    def __init__(self, cands: Sequence[Candidate], op: Operator, cap: int | None) -> None:
        self.cands = cands
        start = op.start()
        free = op.units(start)
        self.cap = cap if cap is not None else free
        # per layer: state -> (cost, previous state, amount)
        self.layers: list[dict[Hashable, tuple[float, Any, int]]] = [{start: (0.0, None, 0)}]
        self.slack: list[int] = [free]
        self.absorb: list[int] = [0]
        base = 0
        absorb = 0
        take, units = op.take, op.units
        for c in cands:
            base += c.amounts[0]
            absorb += c.amounts[-1] - c.amounts[0]
            if base > free:
                break
            floor = free - base - self.cap  # fewer free units than this: extra > cap
            prev = self.layers[-1]
            cur: dict[Hashable, tuple[float, Any, int]] = {}
            pairs = list(zip(c.amounts, c.costs, strict=True))
            for state, (cost, _, _) in prev.items():
                for a, dc in pairs:
                    nxt = take(state, a)
                    if nxt is None or units(nxt) < floor:
                        continue
                    total = cost + dc
                    old = cur.get(nxt)
                    if old is None or total < old[0]:
                        cur[nxt] = (total, state, a)
            if not cur:
                break
            self.layers.append(cur)
            self.slack.append(free - base)
            self.absorb.append(absorb)

    def exact(self, j: int) -> bool:
        return j >= len(self.layers) or min(self.slack[j], self.absorb[j]) <= self.cap

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
    first = waiting[0]
    rest: Iterable[Waiting] = waiting
    if depth > 1 and len(first.amounts) > 1:
        rest = itertools.islice(waiting, 1, None)
        tries = [a for a in first.amounts[:depth] if a <= len(heap)]
        if tries:
            smallest = heapq.nsmallest(tries[-1], heap)
            end, a = min((smallest[a - 1] + first.costs[t], a) for t, a in enumerate(tries))
            total += _place(heap, a, end)
    # The rest at their minimum amounts. This loop is most of an elastic round's cost
    # (every prefix weighed runs it over the lookahead), so the common one-unit case is
    # a single heap operation, with the functions bound to locals.
    replace, size = heapq.heapreplace, len(heap)
    for w in rest:
        a = w.amounts[0]
        if a == 1:
            end = heap[0] + w.costs[0]
            replace(heap, end)
            total += end
        elif a <= size:
            total += _place(heap, a, heapq.nsmallest(a, heap)[-1] + w.costs[0])
    return total


def _place(heap: list[float], amount: int, end: float) -> float:
    """Take the ``amount`` earliest-free units of ``heap`` until ``end``; ``end``."""
    for _ in range(amount):
        heapq.heappop(heap)
    for _ in range(amount):
        heapq.heappush(heap, end)
    return end
