"""Invalid actions are refused at submit, saying what is wrong and what would fit."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from tangram.spec import (
    Action,
    Amdahl,
    Demand,
    EfficiencyTable,
    InvalidAction,
    parse_efficiency,
)

POOLS: dict[str, Any] = {
    "cpu": {
        "kind": "cpu",
        "nodes": [
            {"name": "a", "cores": 8, "memory_gb": 32},
            {"name": "b", "cores": 4, "memory_gb": 64},
        ],
    },
    "gpu": {
        "kind": "gpu",
        "nodes": [{"name": "g", "gpus": 8, "memory_gb": 80}],
        "services": {
            "rm": {"memory_gb": 40, "restore_seconds": 5},
            "tp": {"memory_gb": 160, "restore_seconds": 10, "parallelism": [2, 4]},
            "huge": {"memory_gb": 200, "restore_seconds": 10, "parallelism": [1, 2]},
        },
    },
    "api": {"kind": "quota", "concurrency": 2, "tokens_per_minute": 600},
}


@pytest.fixture
def core(make_core):
    return make_core(POOLS)


def A(demands: dict[str, Any], traj: str = "t", **kw: Any) -> Callable[[], Action]:
    return lambda: Action.build(traj, demands, **kw)


INVALID_AT_SUBMIT = {
    "unknown pool": (A({"gpux": 1}), ["unknown pool 'gpux'", "api, cpu, gpu"]),
    "zero amount": (A({"cpu": 0}), ["pool 'cpu' asks for 0 units", "must be positive"]),
    "negative amount": (A({"cpu": -2}), ["asks for -2 units", "must be positive"]),
    "negative range": (A({"cpu": {"min": -1, "max": 4}}), ["asks for -1 units"]),
    "zero among choices": (A({"gpu": [0, 2]}), ["pool 'gpu' asks for 0 units"]),
    "min above max": (
        A({"cpu": {"min": 5, "max": 2}}),
        ["min 5 > max 2", "{'min': 2, 'max': 5}"],
    ),
    "cpu larger than any node": (
        A({"cpu": 16}),
        ["cpu=16 can never fit", "the largest node of pool 'cpu' has 8 cores"],
    ),
    "cpu range above any node": (
        A({"cpu": {"min": 9, "max": 12}}),
        ["can never fit", "has 8 cores"],
    ),
    "gpu not a chunk size": (
        A({"gpu": 3}),
        ["gpu=3 can never fit", "aligned chunks of 1, 2, 4, 8 inside one node"],
    ),
    "gpu larger than a node": (A({"gpu": 16}), ["gpu=16 can never fit", "1, 2, 4, 8"]),
    "gpu choices none a chunk": (A({"gpu": [3, 5, 6]}), ["can never fit", "chunks of 1, 2, 4, 8"]),
    "memory above any node": (
        A({"cpu": 1}, memory_gb=128),
        ["memory 128 GB can never fit", "largest node of pool 'cpu' has 64 GB"],
    ),
    "no node has both cores and memory": (
        A({"cpu": 6}, memory_gb=48),
        ["no node of pool 'cpu' has both 6 cores and 48 GB", "a (8 cores, 32 GB)", "b (4 cores"],
    ),
    "negative memory": (A({"cpu": 1}, memory_gb=-1.0), ["memory_gb must not be negative"]),
    "key not among demands": (
        A({"cpu": {"min": 1, "max": 4}}, key="gpu"),
        ["key resource 'gpu' is not among the demands (cpu)", "leave key out"],
    ),
    "service unknown to the gpu pool": (
        A({"gpu": 1}, service="nope"),
        ["service 'nope' is unknown to GPU pool 'gpu'", "known services: huge, rm, tp"],
    ),
    "service without a gpu demand": (
        A({"cpu": 1}, service="rm"),
        ["service 'rm' needs a GPU demand", "demand GPUs from gpu"],
    ),
    "unknown service without a gpu demand": (
        A({"cpu": 1}, service="nope"),
        ["service 'nope' needs a GPU demand", "no GPU pool knows it"],
    ),
    "service parallelism not in demand": (
        A({"gpu": 1}, service="tp"),
        ["service 'tp' runs with [2, 4] GPUs", "gpu=1 allows [1]"],
    ),
    "service parallelism choices disjoint": (
        A({"gpu": [1, 8]}, service="tp"),
        ["runs with [2, 4] GPUs", "allows [1, 8]"],
    ),
    "service too big for gpu memory": (
        A({"gpu": [1, 2]}, service="huge"),
        ["service 'huge' needs 100 GB per GPU with 2 GPUs", "have 80 GB"],
    ),
    "tokens above tokens per minute": (
        A({"api": 1}, tokens=700),
        ["expects 700 tokens", "allows 600 tokens per minute"],
    ),
    "amount above concurrency cap": (
        A({"api": 3}),
        ["asks for at least 3 permits", "concurrency cap 2 allows at most 2 per action"],
    ),
    "negative duration": (
        A({"cpu": 1}, duration=-1.0),
        ["duration must be a non-negative number, got -1"],
    ),
    "nan duration": (A({"cpu": 1}, duration=math.nan), ["duration must be a non-negative"]),
    "infinite duration": (A({"cpu": 1}, duration=math.inf), ["duration must be"]),
    "negative tokens": (A({"api": 1}, tokens=-5), ["tokens must not be negative, got -5"]),
    "zero ttl": (A({"cpu": 1}, ttl=0.0), ["ttl must be a positive number"]),
    "empty demands": (A({}), ["must demand at least one pool", "cpu", "gpu", "api"]),
    "empty trajectory": (A({"cpu": 1}, traj=""), ["needs a trajectory id"]),
}


@pytest.mark.parametrize("case", list(INVALID_AT_SUBMIT), ids=list(INVALID_AT_SUBMIT))
def test_invalid_action_is_refused_at_submit_and_nothing_is_queued(core, case):
    build, needles = INVALID_AT_SUBMIT[case]
    before = (core.queue_length, core.counts["submitted"])
    with pytest.raises(InvalidAction) as err:
        core.submit(build(), 0.0)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert (core.queue_length, core.counts["submitted"]) == before
    assert all(p["queued"] == 0 for p in core.snapshot(0.0)["pools"].values())
    assert core.schedule(0.0) == []


def test_an_invalid_second_demand_queues_nothing(core):
    with pytest.raises(InvalidAction, match="gpu=3 can never fit"):
        core.submit(Action.build("t", {"cpu": 1, "gpu": 3}), 0.0)
    assert core.queue_length == 0
    assert core.snapshot(0.0)["pools"]["cpu"]["queued"] == 0
    # The pool is still usable.
    core.submit(Action.build("t", {"cpu": 1}), 0.0)
    assert len(core.schedule(0.0)) == 1


def test_demand_above_the_pinned_node_says_so(core):
    core.submit(Action.build("t1", {"cpu": 1}, memory_gb=48), 0.0)
    (g,) = core.schedule(0.0)
    assert g.lease.allocation["cpu"].node == "b"  # only b has 48 GB
    core.release(g.lease.id, 1.0)
    with pytest.raises(InvalidAction) as err:
        core.submit(Action.build("t1", {"cpu": 6}), 1.0)
    msg = str(err.value)
    assert "pinned to node 'b', which has 4 cores" in msg
    assert "ask for at most 4 or close the trajectory" in msg
    assert core.queue_length == 0


def test_duplicate_action_id_is_refused(core):
    a = Action.build("t", {"cpu": 1})
    a.id = "x"
    core.submit(a, 0.0)
    b = Action.build("t", {"cpu": 1})
    b.id = "x"
    with pytest.raises(InvalidAction, match="action id 'x' is already in use"):
        core.submit(b, 0.0)
    assert core.queue_length == 1


def test_valid_actions_of_every_kind_are_accepted(core):
    ok = [
        Action.build("t1", {"cpu": {"min": 2, "max": 16}}),  # max above a node is trimmed
        Action.build("t2", {"gpu": [1, 3]}),  # 3 is dropped, 1 fits
        Action.build("t3", {"gpu": {"choices": [2, 4, 8]}}, service="tp"),
        Action.build("t4", {"api": 2}, tokens=600),
        Action.build("t5", {"cpu": 1, "api": 1}, duration=0.0, ttl=5.0),
    ]
    for a in ok:
        core.submit(a, 0.0)
    assert core.queue_length == len(ok)


def test_feasible_amounts_are_trimmed_to_what_the_pools_can_grant(core):
    assert core.validate(Action.build("t", {"cpu": {"min": 6, "max": 12}})) == {"cpu": (6, 7, 8)}
    assert core.validate(Action.build("t", {"gpu": {"min": 1, "max": 8}})) == {"gpu": (1, 2, 4, 8)}
    assert core.validate(Action.build("t", {"gpu": [1, 2, 4, 8]}, service="tp")) == {"gpu": (2, 4)}
    assert core.validate(Action.build("t", {"api": {"min": 1, "max": 5}})) == {"api": (1, 2)}


# --------------------------------------------------------------------------- wire forms


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("abc", "demand for pool 'cpu' is 'abc'; write a number (4)"),
        (None, "write a number (4), a range"),
        ({"foo": 1}, 'choices ({"choices": [1, 2, 4, 8]})'),
        ((1, 2, 3), "demand for pool 'cpu' is (1, 2, 3)"),
        (True, "must be a number, a range or choices"),
        (1.5, "is 1.5; write a number"),
        ([1, "x"], "'x' is not a whole number of units"),
        ([1, 2.5], "2.5 is not a whole number of units"),
        ({"min": 1, "max": "8"}, "'8' is not a whole number"),
        ({"choices": 3}, "choices must be a list"),
        ([], "choices must not be empty"),
        ({"choices": []}, "choices must not be empty"),
    ],
)
def test_demand_parse_refuses_garbage(raw, needle):
    with pytest.raises(InvalidAction) as err:
        Demand.parse(raw, "cpu")
    assert needle in str(err.value)


def test_demand_parse_reads_every_wire_form():
    assert Demand.parse(4) == Demand(4, 4)
    assert Demand.parse(4.0) == Demand(4, 4)
    assert Demand.parse((1, 8)) == Demand(1, 8)
    assert Demand.parse({"min": 1, "max": 8}) == Demand(1, 8)
    assert Demand.parse({"min": 3}) == Demand(3, 3)
    assert Demand.parse([4, 1, 2, 2]) == Demand(1, 4, (1, 2, 4))
    assert Demand.parse({"choices": [8, 2]}).amounts() == (2, 8)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"amdahl": 1.5}, "amdahl=1.5: the parallel fraction must be in [0, 1]"),
        ({"amdahl": -0.1}, "the parallel fraction must be in [0, 1]"),
        ({"amdahl": "high"}, "the parallel fraction must be in [0, 1]"),
        ({"amdahl": True}, "the parallel fraction must be in [0, 1]"),
        ({"table": {"1": 1.0, "2": 1.2}}, "E(m) in (0, 1]"),
        ({"table": {"1": 1.0, "2": 0.0}}, "E(m) in (0, 1]"),
        ({"table": {"1": -0.5}}, "E(m) in (0, 1]"),
        ({"table": {"0": 1.0}}, "units must be positive"),
        ({"table": {"x": 1.0}}, "must map units to a number"),
        ({"table": {"2": "fast"}}, "must map units to a number"),
        ({"table": {}}, "efficiency table is empty"),
        ({"gustafson": 0.5}, "is not understood; write {'amdahl': 0.95}"),
        (0.9, "is not understood"),
    ],
)
def test_bad_efficiency_is_refused(raw, needle):
    with pytest.raises(InvalidAction) as err:
        parse_efficiency(raw)
    assert needle in str(err.value)
    with pytest.raises(InvalidAction):
        Action.build("t", {"cpu": {"min": 1, "max": 4}}, duration=1.0, efficiency=raw)


def test_edge_efficiencies_are_accepted():
    assert parse_efficiency({"amdahl": 0}) == Amdahl(0.0)
    assert parse_efficiency({"amdahl": 1}) == Amdahl(1.0)
    table = parse_efficiency({"table": {"4": 0.5, "1": 1.0}})
    assert table == EfficiencyTable(((1, 1.0), (4, 0.5)))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "eff", [Amdahl(1.5), Amdahl(-0.5), EfficiencyTable(((1, 1.0), (2, 1.5)))], ids=str
)
def test_bad_efficiency_on_a_directly_built_action_is_refused_at_submit(core, eff):
    action = Action("t", {"cpu": Demand(1, 4)}, duration=10.0, efficiency=eff)
    with pytest.raises(InvalidAction):
        core.submit(action, 0.0)
    assert core.queue_length == 0
