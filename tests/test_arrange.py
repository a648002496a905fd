"""The allocation DP against brute force, and its three implementations against each other."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangram.core.arrange import (
    Candidate,
    Waiting,
    _CountDP,
    _ScanDP,
    _StateDP,
    solve,
    waiting_cost,
)
from tangram.core.managers.base import CountOperator, Operator
from tangram.core.managers.gpu import ChunkOperator, take_chunk

GPU_SIZES = (1, 2, 4, 8)


def brute_force(cands: list[Candidate], op: Operator) -> float:
    """Try every combination of amounts, taking units in candidate order."""
    best = math.inf
    for combo in itertools.product(*(range(len(c.amounts)) for c in cands)):
        state = op.start()
        cost = 0.0
        for c, t in zip(cands, combo, strict=True):
            state = op.take(state, c.amounts[t])
            if state is None:
                break
            cost += c.costs[t]
        else:
            best = min(best, cost)
    return best


def replay(cands: list[Candidate], op: Operator, amounts: list[int]) -> float:
    """The cost of a DP answer, checking every amount is feasible and fits in order."""
    state = op.start()
    cost = 0.0
    for c, a in zip(cands, amounts, strict=True):
        assert a in c.amounts
        state = op.take(state, a)
        assert state is not None, "the DP's allocation does not fit"
        cost += c.costs[c.amounts.index(a)]
    return cost


@st.composite
def demand_amounts(draw: st.DrawFn, gpu: bool) -> tuple[int, ...]:
    """Feasible amounts as a pool would narrow them: fixed, range or choices."""
    shape = draw(st.sampled_from(["fixed", "range", "choices"]))
    if gpu:
        if shape == "fixed":
            return (draw(st.sampled_from(GPU_SIZES)),)
        if shape == "range":
            lo = draw(st.sampled_from(GPU_SIZES))
            hi = draw(st.sampled_from([s for s in GPU_SIZES if s >= lo]))
            return tuple(s for s in GPU_SIZES if lo <= s <= hi)
        return tuple(sorted(draw(st.sets(st.sampled_from(GPU_SIZES), min_size=1))))
    if shape == "fixed":
        return (draw(st.integers(1, 6)),)
    if shape == "range":
        lo = draw(st.integers(1, 5))
        return tuple(range(lo, draw(st.integers(lo, 10)) + 1))
    return tuple(sorted(draw(st.sets(st.integers(1, 10), min_size=1, max_size=4))))


@st.composite
def candidates(draw: st.DrawFn, gpu: bool, max_n: int = 6) -> list[Candidate]:
    n = draw(st.integers(1, max_n))
    out = []
    for _ in range(n):
        amounts = draw(demand_amounts(gpu))
        costs = tuple(
            draw(st.floats(0.01, 100.0, allow_nan=False, allow_infinity=False)) for _ in amounts
        )
        out.append(Candidate(amounts, costs))
    return out


@st.composite
def chunk_states(draw: st.DrawFn) -> tuple[int, ...]:
    """Free chunk counts reachable from 1 or 2 empty 8-GPU nodes by some allocations."""
    counts: tuple[int, ...] | None = (0, 0, 0, draw(st.integers(1, 2)))
    for k in draw(st.lists(st.sampled_from(GPU_SIZES), max_size=4)):
        assert counts is not None
        counts = take_chunk(counts, k) or counts
    assert counts is not None
    return counts


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_every_prefix(cands: list[Candidate], op: Operator, cap: int | None) -> None:
    dp = solve(cands, op, cap)
    for j in range(1, len(cands) + 1):
        if not dp.exact(j):
            continue
        want = brute_force(cands[:j], op)
        cost, amounts = dp.best(j)
        if math.isinf(want):
            assert math.isinf(cost)
            continue
        assert cost == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert replay(cands[:j], op, amounts) == pytest.approx(cost, rel=1e-9, abs=1e-9)


@SETTINGS
@given(cands=candidates(gpu=False), free=st.integers(0, 16), cap=st.sampled_from([None, 2, 5]))
def test_count_dp_matches_brute_force_for_every_prefix(
    cands: list[Candidate], free: int, cap: int | None
) -> None:
    check_every_prefix(cands, CountOperator(free), cap)


@SETTINGS
@given(cands=candidates(gpu=True), counts=chunk_states(), cap=st.sampled_from([None, 2, 4]))
def test_chunk_dp_matches_brute_force_for_every_prefix(
    cands: list[Candidate], counts: tuple[int, ...], cap: int | None
) -> None:
    check_every_prefix(cands, ChunkOperator(counts), cap)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cands=candidates(gpu=False, max_n=60), data=st.data())
def test_prefix_scan_agrees_with_layered_pass(cands: list[Candidate], data: st.DataObject) -> None:
    total_min = sum(c.amounts[0] for c in cands)
    free = data.draw(st.integers(max(0, total_min - 10), total_min + 20))
    cap = data.draw(st.integers(0, 16))
    scan = _ScanDP(cands, free, cap)
    layered = _CountDP(cands, free, None)  # uncapped: exact everywhere
    for j in range(len(cands) + 1):
        if not scan.exact(j):
            continue
        c1, a1 = scan.best(j)
        c2, _ = layered.best(j)
        if math.isinf(c2):
            assert math.isinf(c1)
            continue
        assert c1 == pytest.approx(c2, rel=1e-9, abs=1e-9)
        assert replay(cands[:j], CountOperator(free), a1) == pytest.approx(c1, rel=1e-9, abs=1e-9)


def test_state_dp_on_counts_agrees_with_numpy_pass() -> None:
    cands = [Candidate((1, 2, 3, 4), (8.0, 4.5, 3.2, 2.6)), Candidate((2, 4), (5.0, 2.0))]
    for free in range(0, 9):
        a = _StateDP(cands, CountOperator(free), None).best(2)
        b = _CountDP(cands, free, None).best(2)
        assert a[0] == pytest.approx(b[0]) if math.isfinite(b[0]) else math.isinf(a[0])


def test_spare_units_go_where_they_save_the_most_time() -> None:
    # Perfectly parallel candidates of 1 s and 100 s: with 6 units the long one gets every
    # spare unit (1 + 100/5 = 21 beats 1/2 + 100/4 = 25.5).
    ms = range(1, 6)
    short = Candidate(tuple(ms), tuple(1 / m for m in ms))
    long = Candidate(tuple(ms), tuple(100 / m for m in ms))
    cost, amounts = solve([short, long], CountOperator(6), None).best(2)
    assert amounts == [1, 5]
    assert cost == pytest.approx(21.0)


def test_waiting_estimate_places_actions_on_the_earliest_free_units() -> None:
    # 2 units: one busy until t=5, one free. A kept candidate takes the free unit for 3 s.
    # The first waiting action (1 unit, 4 s) starts at 3 and ends at 7; the second
    # (1 unit, 1 s) starts at 5 and ends at 6.
    total = waiting_cost([5.0], 1, [(1, 3.0)], [Waiting((1,), (4.0,)), Waiting((1,), (1.0,))], 2)
    assert total == pytest.approx(7 + 6)


def test_waiting_estimate_lets_the_head_try_more_units_with_depth() -> None:
    # Both units free; the head can run on 1 unit (10 s) or 2 units (6 s).
    head = Waiting((1, 2), (10.0, 6.0))
    assert waiting_cost([], 2, [], [head], depth=1) == pytest.approx(10.0)
    assert waiting_cost([], 2, [], [head], depth=2) == pytest.approx(6.0)
