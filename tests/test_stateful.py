"""Random sequences of submit / schedule / release / heartbeat / expire / cancel / close
against the core, checking after every step that:

- no core id or GPU is held by two leases, and every lease's units are really taken;
- no pool exceeds its capacity, concurrency cap or windowed quota;
- order: a grant never overtakes a waiting action that comes before it in the round's
  order and competes for the same units (the same quota or GPU pool, or the same CPU
  node). The order is FCFS, or with ``tangram``'s bounded shortest-first the actions
  queued ``overdue`` seconds or longer in FCFS order, then the others by declared
  duration (in classes a factor ``grain`` apart, FCFS within a class), those on the
  pool of GPU services (the paper's) first and in FCFS order (worked out here from
  that rule, not read from the core);
- when everything ends (leases released, queue cancelled, trajectories closed) every
  unit, slot and gigabyte is back.
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from tangram.config import parse_config
from tangram.core.managers.cpu import CpuManager
from tangram.core.managers.gpu import GpuManager
from tangram.core.managers.quota import QuotaManager
from tangram.core.policy import parse_policy
from tangram.core.state import Core
from tangram.spec import Action, InvalidAction, LeaseExpired

CONFIG: dict[str, Any] = {
    "pools": {
        # One node: every CPU action competes with every other.
        "cpu": {"kind": "cpu", "nodes": [{"name": "a", "cores": 6, "numa": 2, "memory_gb": 16}]},
        # Two nodes: trajectories are pinned; competition is per node.
        "cpu2": {"kind": "cpu", "nodes": [{"count": 2, "cores": 4, "numa": 2, "memory_gb": 8}]},
        "gpu": {
            "kind": "gpu",
            "nodes": [{"count": 2, "gpus": 4, "memory_gb": 10}],
            "services": {
                "small": {"memory_gb": 4, "restore_seconds": 1.0, "parallelism": [1, 2]},
                "big": {"memory_gb": 16, "restore_seconds": 3.0, "parallelism": [2, 4]},
            },
        },
        "api": {
            "kind": "quota",
            "concurrency": 3,
            "window": {"limit": 8, "seconds": 10},
            "rate": {"per_second": 2, "burst": 3},
            "tokens_per_minute": 600,
            "default_tokens": 50,
        },
    }
}

TRAJECTORIES = [f"t{i}" for i in range(8)]


@st.composite
def demands(draw: st.DrawFn) -> dict[str, Any]:
    pools = draw(st.sets(st.sampled_from(["cpu", "cpu2", "gpu", "api"]), min_size=1, max_size=2))
    out: dict[str, Any] = {}
    for p in pools:
        if p in ("cpu", "cpu2"):
            lo = draw(st.integers(1, 3))
            out[p] = draw(st.sampled_from([lo, {"min": lo, "max": lo + draw(st.integers(0, 3))}]))
        elif p == "gpu":
            out[p] = draw(st.sampled_from([1, 2, {"choices": [1, 2]}, {"min": 1, "max": 4}]))
        else:
            out[p] = 1
    return out


@st.composite
def actions(draw: st.DrawFn) -> Action:
    dem = draw(demands())
    service = draw(st.sampled_from([None, "small", "big"])) if "gpu" in dem else None
    return Action.build(
        draw(st.sampled_from(TRAJECTORIES)),
        dem,
        duration=draw(st.floats(0.1, 10.0)),
        efficiency={"amdahl": draw(st.floats(0.5, 1.0))},
        service=service,
        memory_gb=draw(st.sampled_from([0.0, 2.0, 5.0])),
        tokens=draw(st.sampled_from([None, 10, 200])),
    )


class CoreMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.core: Core
        self.now = 0.0
        self.policy = "tangram"

    @initialize(
        policy=st.sampled_from(
            ["tangram", "tangram:overdue=1", "tangram:overdue=1,grain=1", "tangram:overdue=0",
             "paper", "min", "fixed:2"]
        )
    )
    def setup(self, policy: str) -> None:
        cfg = parse_config(CONFIG)
        self.policy = policy
        self.core = Core(cfg.build_pools(), parse_policy(policy), lease_ttl=5.0)

    # ------------------------------------------------------------------ rules
    @rule(batch=st.lists(actions(), min_size=1, max_size=6))
    def submit(self, batch: list[Action]) -> None:
        # Several at once, so queues form and the scheduler has real choices to make.
        for action in batch:
            before = self.core.queue_length
            try:
                self.core.submit(action, self.now)
            except InvalidAction as exc:
                assert str(exc)
                assert self.core.queue_length == before, "an invalid action was queued"

    @rule(target=leases)
    def schedule(self) -> Any:
        waiting_before = list(self.core.queued())
        grants = self.core.schedule(self.now)
        self._check_order(waiting_before, [g.action for g in grants])
        return st.just(None) if not grants else grants[0].lease.id

    @rule(lease_id=consumes(leases), tokens=st.sampled_from([None, 0, 30, 400]))
    def release(self, lease_id: Any, tokens: int | None) -> None:
        if not isinstance(lease_id, str):
            return
        try:
            self.core.release(lease_id, self.now, "ok", {"tokens": tokens} if tokens else None)
        except LeaseExpired:
            assert self.core.lease_state(lease_id) == "expired"
        # Releasing twice is not an error.
        if self.core.lease_state(lease_id) == "released":
            assert self.core.release(lease_id, self.now) is None

    @rule(pick=st.integers(0, 1000))
    def release_any(self, pick: int) -> None:
        if self.core.leases:
            ids = sorted(self.core.leases)
            self.core.release(ids[pick % len(ids)], self.now)

    @rule(pick=st.integers(0, 1000))
    def heartbeat(self, pick: int) -> None:
        if self.core.leases:
            ids = sorted(self.core.leases)
            lid = ids[pick % len(ids)]
            if self.core.leases[lid].expires_at > self.now:
                assert self.core.heartbeat(lid, self.now) == self.now + self.core.leases[lid].ttl

    @rule(dt=st.sampled_from([0.1, 0.5, 2.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.now += dt
        for ev in self.core.expire(self.now):
            assert ev.lease.expires_at <= self.now
        assert all(lease.expires_at > self.now for lease in self.core.leases.values())

    @rule(pick=st.integers(0, 1000))
    def cancel(self, pick: int) -> None:
        queued = [a.id for a in self.core.queued()]
        if queued:
            aid = queued[pick % len(queued)]
            assert self.core.cancel(aid, self.now) is not None
            assert not self.core.is_queued(aid)

    @rule(traj=st.sampled_from(TRAJECTORIES))
    def close(self, traj: str) -> None:
        self.core.close_trajectory(traj, self.now)
        assert all(a.trajectory != traj for a in self.core.queued())

    @precondition(lambda self: hasattr(self, "core"))
    @rule()
    def drain(self) -> None:
        """End everything; every unit must come back."""
        for aid in [a.id for a in self.core.queued()]:
            self.core.cancel(aid, self.now)
        for lid in list(self.core.leases):
            self.core.release(lid, self.now)
        for traj in TRAJECTORIES:
            self.core.close_trajectory(traj, self.now)
        self._check_all_free()

    # ------------------------------------------------------------------ checks
    def _expected(self, a: Action) -> float:
        """``tangram``'s expected duration: every action here declares its own; those on
        the pool of GPU services (which the paper's scheduler arranges) keep FCFS; others
        in classes: the largest power of ``grain`` not above the duration."""
        assert a.duration is not None
        if "gpu" in a.demands or a.duration <= 0.0:
            return 0.0
        grain = self.core.policy.grain  # type: ignore[attr-defined]
        if grain == 1.0:
            return a.duration
        return float(grain ** math.floor(math.log(a.duration) / math.log(grain) + 1e-9))

    def _rank(self, a: Action) -> tuple[float, ...]:
        """Where ``a`` comes in this round's order."""
        overdue = self.core.policy.overdue
        if overdue <= 0.0 or self.now - a.submitted_at >= overdue:
            return (0.0, a.seq)
        return (1.0, self._expected(a), a.seq)

    def _check_order(self, waiting_before: list[Action], granted: list[Action]) -> None:
        granted_ids = {a.id for a in granted}
        still = [a for a in waiting_before if a.id not in granted_ids]
        for b in granted:
            for a in still:
                if self._rank(a) > self._rank(b):
                    continue
                for pool in set(a.demands) & set(b.demands):
                    assert not self._compete(pool, a, b), (
                        f"{b.id} was granted on {pool} ahead of {a.id}, before it in order"
                    )

    def _compete(self, pool: str, a: Action, b: Action) -> bool:
        mgr = self.core.pools[pool]
        if not isinstance(mgr, CpuManager):
            return True
        pin_a = mgr.pins.get(a.trajectory)
        lease_b = next(lease for lease in self.core.leases.values() if lease.action.id == b.id)
        node_b = mgr.nodes[str(lease_b.allocation[pool].node)]
        if pin_a is None and node_b.memory_free < a.memory_gb:
            # A new trajectory waiting for memory does not hold back the pinned ones on a
            # node without that memory: only their ending frees it (no deadlock).
            return False
        if len(mgr.nodes) == 1:
            return True
        if pin_a is None:
            # An unpinned waiter that did not fit anywhere competes with every node; one
            # the scheduler chose to defer was meant for one node only, which we cannot
            # see from here: judge only pinned pairs on this pool.
            return False
        return pin_a[0] == lease_b.allocation[pool].node

    @invariant()
    def the_shortest_first_index_is_the_queue_sorted(self) -> None:
        if not hasattr(self, "core"):
            return
        index = self.core._shortest
        if index is None:
            assert self.core.policy.overdue == 0.0
            return
        assert index == sorted(index)
        assert [item[2] for item in index] == [
            a.id for a in sorted(self.core.queued(), key=lambda a: (self._expected(a), a.seq))
        ]

    @invariant()
    def units_are_held_once_and_within_capacity(self) -> None:
        if not hasattr(self, "core"):
            return
        held: dict[tuple[str, Any, Any], str] = {}
        for lease in self.core.leases.values():
            for pool, alloc in lease.allocation.items():
                for u in alloc.units:
                    key = (pool, alloc.node, u)
                    assert key not in held, f"{key} held by {held[key]} and {lease.id}"
                    held[key] = lease.id
        for name, mgr in self.core.pools.items():
            if isinstance(mgr, CpuManager):
                for node in mgr.nodes.values():
                    free = {c for g in node.free for c in g}
                    taken = {u for (p, n, u) in held if p == name and n == node.name}
                    assert not free & taken, "a held core is also free"
                    assert len(free) + len(taken) == node.cores
                    assert node.free_count == len(free)
                    assert node.memory_free >= -1e-9
            elif isinstance(mgr, GpuManager):
                for node_name, busy in mgr.busy.items():
                    taken = {u for (p, n, u) in held if p == name and n == node_name}
                    assert taken == {g for g, b in enumerate(busy) if b}
                    for g in range(len(busy)):
                        assert mgr.mem_used[node_name][g] <= mgr.nodes[node_name].memory_gb + 1e-9
            elif isinstance(mgr, QuotaManager):
                assert mgr.concurrency is not None and 0 <= mgr.in_use <= mgr.concurrency
                assert mgr.window_limit is not None
                assert mgr._window_count <= mgr.window_limit
                in_use = sum(
                    lease.allocation[name].amount
                    for lease in self.core.leases.values()
                    if name in lease.allocation
                )
                assert in_use == mgr.in_use

    def _check_all_free(self) -> None:
        assert not self.core.leases and self.core.queue_length == 0
        for mgr in self.core.pools.values():
            if isinstance(mgr, CpuManager):
                for node in mgr.nodes.values():
                    assert node.free_count == node.cores
                    assert sorted(c for g in node.free for c in g) == sorted(
                        c for g in node.numa for c in g
                    )
                    assert abs(node.memory_free - node.memory_gb) < 1e-9
                assert not mgr.pins
            elif isinstance(mgr, GpuManager):
                for node_name, node in mgr.nodes.items():
                    assert not any(mgr.busy[node_name])
                    # Buddies coalesced back into one whole-node chunk.
                    assert mgr.free[node_name][node.gpus] == {0}
                    assert all(not mgr.free[node_name][s] for s in mgr.sizes if s < node.gpus)
            elif isinstance(mgr, QuotaManager):
                assert mgr.in_use == 0
                assert sorted(mgr._free_slots) == list(range(mgr.concurrency or 0))


CoreMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestCore = CoreMachine.TestCase
