"""Prometheus metrics of one broker core (docs/observability.md lists every metric).

Two halves, both on one ``CollectorRegistry``:
- an observer of the core's events (submit, refuse, grant, end, cancel, round) that
  feeds counters and histograms as things happen;
- a collector that reads the pools at scrape time (capacity, units in use, busy and
  idle unit-seconds, queue length, GPU cache and quota state), so gauges are never stale
  and cost nothing between scrapes.

Labels are low-cardinality only: pool, node, kind, task, tenant, outcome, reason, limit
(and version, on ``tangram_build_info``). Never a label per action, lease or trajectory.
Scrape from the thread that drives the core (the HTTP route does: it runs on the
broker's event loop).

Importing this module turns off prometheus-client's ``*_created`` series (one more
series per counter and histogram label set, which nothing here reads) for the process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import tangram
from tangram import kinds
from tangram.core.state import Core
from tangram.spec import Action, Lease

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Action times span a millisecond sandbox call to a half-hour test suite.
TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0,
)  # fmt: skip
ROUND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
DOP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

disable_created_metrics()  # type: ignore[no-untyped-call]

Child = Callable[..., Any]


def _children(metric: Counter | Histogram) -> Child:
    """``metric.labels``, remembering each child it made: ``labels`` takes a lock and
    checks its arguments on every call, and the observer runs on every grant and end."""
    made: dict[tuple[str, ...], Any] = {}

    def child(*values: str) -> Any:
        c = made.get(values)
        if c is None:
            c = made[values] = metric.labels(*values)
        return c

    return child


class Metrics:
    """Attach to a core: ``Metrics(core, clock)``; ``exposition()`` is the /metrics body."""

    def __init__(
        self,
        core: Core,
        clock: Callable[[], float],
        registry: CollectorRegistry | None = None,
        *,
        process: bool = True,
    ) -> None:
        self.core = core
        self.registry = reg = registry if registry is not None else CollectorRegistry()
        if process:  # process and Python runtime metrics, as every exporter has them
            for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                reg.register(c)

        def counter(name: str, doc: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ("kind", "task"), registry=reg, buckets=buckets)

        who = ("task", "tenant")
        self.submitted = counter("tangram_actions_submitted", "Actions queued.", who)
        self.refused = counter(
            "tangram_actions_refused", "Actions refused at submit, by reason.", ("reason", "tenant")
        )
        self.granted = counter("tangram_actions_granted", "Actions granted a lease.", who)
        self.released = counter(
            "tangram_actions_released", "Leases released, by outcome.", (*who, "outcome")
        )
        self.expired = counter(
            "tangram_actions_expired", "Leases taken back after their TTL ran out.", who
        )
        self.cancelled = counter(
            "tangram_actions_cancelled", "Queued actions cancelled before a grant.", who
        )
        self.act = hist(
            "tangram_action_completion_seconds",
            "Action completion time, submit to release: queue + overhead + restore + execution.",
            TIME_BUCKETS,
        )
        self.queue = hist(
            "tangram_action_queue_seconds", "Time from submit to grant.", TIME_BUCKETS
        )
        self.execution = hist(
            "tangram_action_execution_seconds",
            "Time the lease was held, less scheduling overhead and restore.",
            TIME_BUCKETS,
        )
        self.overhead = hist(
            "tangram_action_overhead_seconds",
            "Scheduling overhead: the wall time of the round that granted the action.",
            TIME_BUCKETS,
        )
        self.restore = hist(
            "tangram_action_restore_seconds",
            "Service restore time paid by GPU actions (their pool's restore estimate).",
            TIME_BUCKETS,
        )
        self.dop = Histogram(
            "tangram_granted_parallelism",
            "Units granted on the key pool to elastic actions.",
            ("pool",),
            registry=reg,
            buckets=DOP_BUCKETS,
        )
        self.round = Histogram(
            "tangram_scheduler_round_seconds",
            "Wall time of one scheduling round.",
            registry=reg,
            buckets=ROUND_BUCKETS,
        )
        self.candidates = Histogram(
            "tangram_scheduler_candidates",
            "Actions admitted (at their minimum) per scheduling round.",
            registry=reg,
            buckets=COUNT_BUCKETS,
        )
        self.deferred = Counter(
            "tangram_scheduler_deferred", "Admitted actions the elastic scheduler deferred.",
            registry=reg,
        )  # fmt: skip
        self._submitted, self._refused = _children(self.submitted), _children(self.refused)
        self._granted, self._released = _children(self.granted), _children(self.released)
        self._expired, self._cancelled = _children(self.expired), _children(self.cancelled)
        self._act, self._queue = _children(self.act), _children(self.queue)
        self._execution, self._overhead = _children(self.execution), _children(self.overhead)
        self._restore, self._dop = _children(self.restore), _children(self.dop)
        reg.register(_PoolCollector(core, clock))
        info = Gauge(
            "tangram_build_info", "The running Tangram's version (always 1).", ("version",),
            registry=reg,
        )  # fmt: skip
        info.labels(tangram.__version__).set(1)
        core.observers.append(self)

    @classmethod
    def of(cls, core: Core, clock: Callable[[], float]) -> Metrics:
        """The metrics of ``core``, made on first use: several doors onto one broker (the
        HTTP server inside a Ray actor) share one registry, never count twice."""
        for o in core.observers:
            if isinstance(o, Metrics):
                return o
        return cls(core, clock)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ the observer
    def _kind(self, action: Action) -> str:
        pools = self.core.pools
        if action.key is not None:
            return pools[action.key].kind
        kinds = {pools[p].kind for p in action.demands}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def on_submit(self, action: Action, now: float) -> None:
        self._submitted(action.task, action.tenant or "").inc()

    def on_refuse(self, action: Action, reason: str) -> None:
        self.refuse(reason, action.tenant)

    def refuse(self, reason: str, tenant: str | None) -> None:
        """Count a submit refused before it reached the core (a door's own refusals:
        a body that is not an action, a missing token...); the core counts its own."""
        self._refused(reason, tenant or "").inc()

    def on_grant(self, lease: Lease, now: float) -> None:
        a = lease.action
        self._granted(a.task, a.tenant or "").inc()
        labels = (self._kind(a), a.task)
        self._queue(*labels).observe(lease.granted_at - a.submitted_at)
        self._overhead(*labels).observe(lease.overhead)
        key = a.key
        if key is not None and a.demands[key].elastic:
            self._dop(key).observe(lease.allocation[key].amount)

    def on_end(self, lease: Lease, now: float) -> None:
        a = lease.action
        who = (a.task, a.tenant or "")
        if lease.state == "expired":
            self._expired(*who).inc()
        else:
            self._released(*who, lease.outcome or "ok").inc()
        labels = (self._kind(a), a.task)
        restore = sum(
            self.core.pools[p].held_cost(a, alloc) for p, alloc in lease.allocation.items()
        )
        held = now - lease.granted_at
        if restore:
            self._restore(*labels).observe(restore)
        self._execution(*labels).observe(max(0.0, held - lease.overhead - restore))
        # The grant time is the round's start; the holder got the lease ``overhead``
        # later, so held time = overhead + restore + execution, and the parts add up.
        self._act(*labels).observe(now - a.submitted_at)

    def on_heartbeat(self, lease: Lease, now: float) -> None:
        pass

    def on_cancel(self, action: Action, now: float) -> None:
        self._cancelled(action.task, action.tenant or "").inc()

    def on_round(self, seconds: float, candidates: int, deferred: int) -> None:
        self.round.observe(seconds)
        self.candidates.observe(candidates)
        if deferred:
            self.deferred.inc(deferred)


class _PoolCollector(Collector):
    """Pool state read at scrape time."""

    def __init__(self, core: Core, clock: Callable[[], float]) -> None:
        self.core = core
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        core, now = self.core, self.clock()
        labels = ["pool", "node", "kind"]
        cap = GaugeMetricFamily(
            "tangram_pool_capacity_units", "Units a pool node has.", labels=labels
        )
        used = GaugeMetricFamily(
            "tangram_pool_units_in_use", "Units held by leases.", labels=labels
        )
        busy = CounterMetricFamily(
            "tangram_pool_busy_unit_seconds", "Unit-seconds held by leases.", labels=labels
        )
        idle = CounterMetricFamily(
            "tangram_pool_idle_unit_seconds",
            "Unit-seconds free (bounded pools only); rate() over busy + idle is the capacity.",
            labels=labels,
        )
        queued = GaugeMetricFamily(
            "tangram_pool_queue_length",
            "Queued actions that demand the pool.",
            labels=["pool", "kind"],
        )
        # What each kind exports beyond that (its manager declares it), for every kind
        # registered, so a family is there even before a pool of its kind has a value.
        extra: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for kind in kinds.KINDS.values():
            for fam in kind.manager.metrics:
                cls = CounterMetricFamily if fam.type == "counter" else GaugeMetricFamily
                extra[fam.name] = cls(f"tangram_{fam.name}", fam.doc, labels=["pool", *fam.labels])
        queue_len = core.queued_per_pool()
        for name, mgr in core.pools.items():
            mgr.tick(now)
            for node, (c, u) in mgr.usage().items():
                lv = [name, node or "all", mgr.kind]
                cap.add_metric(lv, c)
                used.add_metric(lv, u)
                busy.add_metric(lv, mgr.busy_seconds.get(node, 0.0))
                idle.add_metric(lv, mgr.idle_seconds.get(node, 0.0))
            queued.add_metric([name, mgr.kind], queue_len.get(name, 0))
            for family, values, value in mgr.samples(now):
                extra[family].add_metric([name, *values], value)
        active = GaugeMetricFamily("tangram_leases_active", "Leases held now.")
        active.add_metric([], len(core.leases))
        idle_closed = CounterMetricFamily(
            "tangram_trajectories_idle_closed",
            "Trajectories closed by the broker after trajectory_idle_seconds with nothing "
            "queued or held (their clients never closed them).",
        )
        idle_closed.add_metric([], core.counts["idle_closed"])
        open_trajectories = GaugeMetricFamily(
            "tangram_trajectories_active", "Trajectories with an action queued or held now."
        )
        open_trajectories.add_metric([], core.active_trajectories)
        yield from (cap, used, busy, idle, queued)
        yield from extra.values()
        yield from (active, idle_closed, open_trajectories)
