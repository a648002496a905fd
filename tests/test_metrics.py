"""Metrics after a scripted sequence under a controlled clock have exactly the expected
values (counters, busy/idle unit-seconds, histograms)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tangram
from tangram.config import parse_config
from tangram.core.policy import parse_policy
from tangram.core.state import Core
from tangram.metrics import Metrics
from tangram.spec import Action, InvalidAction

POOLS: dict[str, Any] = {
    "cpu": {"kind": "cpu", "nodes": [{"name": "n0", "cores": 4, "numa": 2, "memory_gb": 8}]},
    "gpu": {
        "kind": "gpu",
        "nodes": [{"name": "g0", "gpus": 2, "memory_gb": 10}],
        "services": {"judge": {"memory_gb": 8, "restore_seconds": 2.0, "parallelism": [1]}},
    },
    "api": {
        "kind": "quota",
        "concurrency": 2,
        "rate": {"per_second": 1, "burst": 1},
        "tokens_per_minute": 600,
        "default_tokens": 10,
    },
}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def setup() -> tuple[Core, Metrics, Clock]:
    clock = Clock()
    cfg = parse_config({"pools": POOLS})
    ticks = iter(x * 0.5 for x in range(10_000))  # every round costs exactly 0.5 s
    core = Core(
        cfg.build_pools(),
        parse_policy("min"),
        lease_ttl=10.0,
        cost_clock=lambda: next(ticks),
        start=0.0,
    )
    return core, Metrics(core, clock, process=False), clock


def value(m: Metrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    assert v is not None, f"no sample {name}{labels}"
    return v


def test_busy_idle_counts_and_histograms_are_exact(setup: tuple[Core, Metrics, Clock]) -> None:
    core, m, clock = setup
    # t=0: two CPU actions of 1 and 3 cores; t=2: the first ends; t=5: the second ends.
    a = core.submit(Action.build("t1", {"cpu": 1}, task="coding"), 0.0)
    b = core.submit(Action.build("t2", {"cpu": 3}, task="coding"), 0.0)
    grants = {g.action.id: g.lease for g in core.schedule(0.0)}
    core.release(grants[a.id].id, 2.0)
    core.release(grants[b.id].id, 5.0, outcome="error")
    clock.t = 10.0
    lv = {"pool": "cpu", "node": "n0", "kind": "cpu"}
    assert value(m, "tangram_pool_busy_unit_seconds_total", **lv) == 1 * 2 + 3 * 5
    assert value(m, "tangram_pool_idle_unit_seconds_total", **lv) == 4 * 10 - 17
    assert value(m, "tangram_pool_capacity_units", **lv) == 4
    assert value(m, "tangram_pool_units_in_use", **lv) == 0
    who = {"task": "coding", "tenant": ""}
    assert value(m, "tangram_actions_submitted_total", **who) == 2
    assert value(m, "tangram_actions_granted_total", **who) == 2
    assert value(m, "tangram_actions_released_total", **who, outcome="ok") == 1
    assert value(m, "tangram_actions_released_total", **who, outcome="error") == 1
    kt = {"kind": "cpu", "task": "coding"}
    assert value(m, "tangram_action_completion_seconds_count", **kt) == 2
    assert value(m, "tangram_action_completion_seconds_sum", **kt) == 2 + 5
    assert value(m, "tangram_action_queue_seconds_sum", **kt) == 0
    # Both were granted by one round that cost 0.5 s: overhead 0.5 each, and execution
    # is the held time less it.
    assert value(m, "tangram_action_overhead_seconds_sum", **kt) == 1.0
    assert value(m, "tangram_action_execution_seconds_sum", **kt) == (2 - 0.5) + (5 - 0.5)
    assert value(m, "tangram_action_execution_seconds_bucket", **kt, le="2.5") == 1
    assert value(m, "tangram_scheduler_round_seconds_count") == 1
    assert value(m, "tangram_scheduler_round_seconds_sum") == 0.5
    assert value(m, "tangram_scheduler_candidates_sum") == 2


def test_refusals_expiry_cancel_and_queue(setup: tuple[Core, Metrics, Clock]) -> None:
    core, m, _ = setup
    with pytest.raises(InvalidAction):
        core.submit(Action.build("t", {"cpu": 5}), 0.0)
    with pytest.raises(InvalidAction):
        core.submit(Action.build("t", {"tpu": 1}), 0.0)
    assert value(m, "tangram_actions_refused_total", reason="never_fits", tenant="") == 1
    assert value(m, "tangram_actions_refused_total", reason="unknown_pool", tenant="") == 1
    core.submit(Action.build("t1", {"cpu": 4}, task="x"), 0.0)
    core.schedule(0.0)
    waiting = core.submit(Action.build("t2", {"cpu": 1}, task="x"), 1.0)
    core.schedule(1.0)
    assert value(m, "tangram_pool_queue_length", pool="cpu", kind="cpu") == 1
    core.cancel(waiting.id, 2.0)
    assert value(m, "tangram_actions_cancelled_total", task="x", tenant="") == 1
    core.expire(10.0)
    assert value(m, "tangram_actions_expired_total", task="x", tenant="") == 1
    assert value(m, "tangram_leases_active") == 0


def test_gpu_quota_and_parallelism(setup: tuple[Core, Metrics, Clock]) -> None:
    core, m, clock = setup
    for i in range(2):
        core.submit(Action.build(f"g{i}", {"gpu": 1}, service="judge"), 0.0)
    leases = [g.lease for g in core.schedule(0.0)]
    for lease in leases:
        core.release(lease.id, 3.0)
    core.submit(Action.build("g2", {"gpu": 1}, service="judge"), 3.0)
    (hit,) = core.schedule(3.0)
    core.release(hit.lease.id, 4.0)
    assert value(m, "tangram_gpu_restores_total", pool="gpu") == 2
    assert value(m, "tangram_gpu_cache_hits_total", pool="gpu") == 1
    assert value(m, "tangram_gpu_restore_seconds_total", pool="gpu") == 4.0
    kt = {"kind": "gpu", "task": "default"}
    assert value(m, "tangram_action_restore_seconds_count", **kt) == 2
    assert value(m, "tangram_action_restore_seconds_sum", **kt) == 4.0

    # Quota: burst 1 at 1/s: the second call waits for the bucket: one throttled action.
    for i in range(2):
        core.submit(Action.build(f"q{i}", {"api": 1}, tokens=50), 10.0)
    (first,) = core.schedule(10.0)
    core.release(first.lease.id, 10.5, usage={"tokens": 80})
    assert value(m, "tangram_quota_throttled_total", pool="api") == 1
    assert value(m, "tangram_quota_tokens_estimated_total", pool="api") == 50
    assert value(m, "tangram_quota_tokens_used_total", pool="api") == 80
    clock.t = 10.5
    assert value(m, "tangram_quota_available_permits", pool="api", limit="concurrency") == 2
    assert value(m, "tangram_quota_available_permits", pool="api", limit="rate") == 0.5
    # Tokens under their own name (one unit per metric name): 600 less the 80 used, and
    # half a second's refill at 600 per minute.
    assert value(m, "tangram_quota_available_tokens", pool="api") == 600 - 80 + 0.5 * 10
    assert m.registry.get_sample_value("tangram_quota_available", {"pool": "api"}) is None

    # Elastic actions record their granted parallelism.
    core2 = Core(parse_config({"pools": POOLS}).build_pools(), parse_policy("fixed:2"))
    m2 = Metrics(core2, clock, process=False)
    core2.submit(Action.build("e", {"cpu": {"min": 1, "max": 4}}), 0.0)
    core2.schedule(0.0)
    assert value(m2, "tangram_granted_parallelism_bucket", pool="cpu", le="2.0") == 1
    assert value(m2, "tangram_granted_parallelism_bucket", pool="cpu", le="1.0") == 0


def test_exposition_parses_and_has_no_per_action_labels(
    setup: tuple[Core, Metrics, Clock],
) -> None:
    core, m, _ = setup
    for i in range(3):
        core.submit(Action.build(f"t{i}", {"cpu": 1}), 0.0)
    for g in core.schedule(0.0):
        core.release(g.lease.id, 1.0)
    names = set()
    for fam in text_string_to_metric_families(m.exposition().decode()):
        assert fam.name.startswith("tangram_"), fam.name
        names.add(fam.name)
        for sample in fam.samples:
            assert set(sample.labels) <= {
                "pool",
                "node",
                "kind",
                "task",
                "tenant",
                "outcome",
                "reason",
                "limit",
                "le",
                "version",
            }
    assert "tangram_pool_busy_unit_seconds" in names


def test_build_info_and_no_created_series(setup: tuple[Core, Metrics, Clock]) -> None:
    core, m, _ = setup
    core.submit(Action.build("t", {"cpu": 1}), 0.0)
    core.schedule(0.0)
    assert value(m, "tangram_build_info", version=tangram.__version__) == 1
    text = m.exposition().decode()
    assert "tangram_build_info" in text and "tangram_actions_granted_total" in text
    # A counter's or histogram's creation time is one more series per label set, which
    # no dashboard reads: turned off.
    assert "_created" not in text
