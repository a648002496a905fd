"""The executor that drives the real broker core (``tangram.core.state.Core``) on
virtual time: submit on arrival, one ``Core.schedule(now)`` per instant where something
changed, release when an action's execution (plus any GPU restore) is over.

Execution time follows from the grant: the true duration at the units on the key pool
(``ActionSpec.duration_at``, the arithmetic of ``Action.duration_at``; the action may
have declared another duration, or none, to the scheduler), stretched by
``Manager.latency_factor`` (an engine batching the requests in flight on its instance
when this one starts, and not revised as others join or leave: a simplification), plus
``Manager.held_cost`` (the restore time of a service that was not resident). The core's
own accounting (busy and idle unit-seconds, restores) is read back at the end.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from tangram.core.managers.base import Manager
from tangram.core.policy import Policy
from tangram.core.state import Core, counting_ids
from tangram.sim.engine import ActionRun, Runner
from tangram.sim.provider import HasLimits, Provider
from tangram.spec import Action, InvalidAction

# Leases never expire in the simulator: actions release when they finish, and a TTL that
# ran out would be a simulator bug, not a scheduling decision worth measuring.
SIM_LEASE_TTL = 1e12


class InvariantError(AssertionError):
    """The core let units exceed a pool's capacity or gave one unit to two leases."""


def check_pools(core: Core) -> None:
    """Capacity and exclusivity, checked against the managers and the active leases.
    Units may be held by several leases only on a pool that shares them (GPU request
    slots), and then only by leases of one instance (same epoch, same units)."""
    for name, mgr in core.pools.items():
        for node, (cap, used) in mgr.usage().items():
            if cap and used > cap:
                raise InvariantError(f"pool {name} node {node!r}: {used} units in use > {cap}")
            if used < 0:
                raise InvariantError(f"pool {name} node {node!r}: negative use {used}")
    held: dict[tuple[str, Any, Any], tuple[str, tuple[Any, ...]]] = {}
    per_node: dict[tuple[str, Any], int] = defaultdict(int)
    for lid, lease in core.leases.items():
        for pool, alloc in lease.allocation.items():
            shared = core.pools[pool].shares_units
            first = True
            for u in alloc.units:
                k = (pool, alloc.node, u)
                same = (lease.action.service, alloc.units)
                if k in held:
                    if not shared or held[k][1] != same:
                        raise InvariantError(f"unit {k} held by {held[k][0]} and {lid}")
                    first = False
                held[k] = (lid, same)
            if first:
                per_node[(pool, alloc.node or "")] += alloc.amount
    for (pool, node), amount in per_node.items():
        cap, used = core.pools[pool].usage().get(node, (0, 0))
        if used != amount:
            raise InvariantError(f"pool {pool} node {node!r}: leases hold {amount}, manager {used}")


class CoreExecutor:
    """Runs actions through a ``Core`` built from ``pools`` and ``policy``."""

    def __init__(
        self,
        pools: Mapping[str, Manager],
        policy: Policy,
        *,
        check: bool = False,
        measure: bool = True,
    ) -> None:
        self.core = Core(
            pools,
            policy,
            lease_ttl=SIM_LEASE_TTL,
            cost_clock=time.perf_counter if measure else None,
            start=0.0,
            ids=counting_ids(),  # a run repeats exactly
        )
        self.check = check
        self._dirty = False
        self._wake: float | None = None
        self._runs: dict[str, ActionRun] = {}
        self.runner: Runner | None = None
        # The providers behind the quota pools: every grant is replayed against them, so
        # a broker that let a call over the limit is caught, not assumed away.
        self.providers = {
            n: Provider.of_limits(m.limits) for n, m in pools.items() if isinstance(m, HasLimits)
        }
        self.quota_violations = 0
        self.restores = 0  # grants that paid a restore

    def bind(self, runner: Runner) -> None:
        self.runner = runner

    def start_trajectory(self, traj: int, now: float) -> None:
        pass

    def end_trajectory(self, traj: int, now: float) -> None:
        assert self.runner is not None
        # Frees the trajectory's pin and memory on its CPU node.
        self.core.close_trajectory(self.runner.trajs[traj].id, now)

    def make_action(self, run: ActionRun) -> Action:
        assert self.runner is not None
        t = self.runner.trajs[run.traj]
        s = run.spec
        return Action(
            trajectory=t.id,
            demands=dict(s.demands),
            task=t.task,
            key=s.key,
            # What the action declares: its true duration, unless the run gives the
            # scheduler a wrong one (--duration-error) or none (--hide-durations). The
            # efficiency curve is always the true one.
            duration=s.declared_duration,
            efficiency=s.efficiency,
            service=s.service,
            tokens=s.tokens,
            memory_gb=t.memory_gb,
        )

    def submit(self, run: ActionRun, now: float) -> None:
        try:
            action = self.core.submit(self.make_action(run), now)
        except InvalidAction as exc:
            assert self.runner is not None
            tid = self.runner.trajs[run.traj].id
            raise InvalidAction(f"trajectory {tid}, action {run.index + 1}: {exc}") from None
        self._runs[action.id] = run
        self._dirty = True

    def settle(self, now: float) -> None:
        # A round can only change something after a submit, a release or a quota refill.
        if not self._dirty:
            return
        self._dirty = False
        core = self.core
        if core.queue_length:
            grants = core.schedule(now)
            assert self.runner is not None
            for g in grants:
                lease = g.lease
                run = self._runs.pop(g.action.id)
                a = lease.action
                amount = lease.allocation[a.key].amount if a.key in lease.allocation else 0
                # Execution follows the true duration (the spec's), whatever was declared.
                exec_s = run.spec.duration_at(a.key, amount) or 0.0
                extra = 0.0
                for pool, alloc in lease.allocation.items():
                    mgr = core.pools[pool]
                    extra += mgr.held_cost(a, alloc)
                    if mgr.shares_units:
                        exec_s *= mgr.latency_factor(a, alloc)
                run.started = now
                run.exec_s = exec_s
                run.setup_s = extra
                if extra > 0:
                    self.restores += 1
                run.sched_s = lease.overhead
                run.units = lease.dop
                run.handle = lease.id
                for pool in lease.allocation:
                    prov = self.providers.get(pool)
                    if prov is not None and not prov.admit(now):
                        self.quota_violations += 1
                        prov.in_flight += 1  # it runs anyway; its end hands it back
                self.runner.at(now + exec_s + extra, self._done, run)
            if self.check:
                check_pools(core)
        # Quota refills: time alone may admit the first waiter of a quota pool.
        wake = core.next_wakeup() if core.queue_length else None
        if wake is not None and wake < SIM_LEASE_TTL / 2 and wake > now and wake != self._wake:
            self._wake = wake
            assert self.runner is not None
            self.runner.at(wake, self._wakeup, wake)

    def _wakeup(self, at: float) -> None:
        if self._wake == at:
            self._wake = None
        self._dirty = True

    def _done(self, run: ActionRun) -> None:
        assert self.runner is not None
        now = self.runner.now
        self.core.release(run.handle, now)
        for pool in run.spec.demands:
            prov = self.providers.get(pool)
            if prov is not None:
                prov.done()
        self._dirty = True
        self.runner.finish(run, now)

    def stuck_report(self) -> str:
        core = self.core
        pools = "; ".join(
            f"{n}: {sum(u for _, u in m.usage().values())} units in use"
            for n, m in core.pools.items()
        )
        head = next(iter(core.queued()), None)
        first = (
            f"; first queued: {head.id} of {head.trajectory} demanding "
            f"{ {p: d.to_wire() for p, d in head.demands.items()} }, memory {head.memory_gb:g} GB"
            if head is not None
            else ""
        )
        return f"core: {core.queue_length} queued, {len(core.leases)} leases; {pools}{first}"

    def result(self, now: float) -> dict[str, Any]:
        snap = self.core.snapshot(now)
        pools = {}
        for name, p in snap["pools"].items():
            busy, idle = p["busy_unit_seconds"], p["idle_unit_seconds"]
            pools[name] = {
                "capacity": p["capacity"],
                "busy_unit_s": busy,
                "idle_unit_s": idle,
                "utilization": busy / (busy + idle) if busy + idle > 0 else None,
            }
        return {
            "pools": pools,
            "restores": self.restores,
            "quota_violations": self.quota_violations,
            "rounds": self.core.stats.rounds,
            "sched_wall_s": self.core.stats.seconds,
        }
