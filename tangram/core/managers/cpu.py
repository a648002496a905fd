"""The CPU manager: exact core ids on nodes with NUMA groups, trajectories pinned to nodes.

Each core serves one action at a time. A trajectory is pinned to a node at its first
action (enough free cores now, enough memory for its declared memory); the memory stays
reserved until the trajectory closes, and every later action runs on that node. Elastic
actions get cores from one NUMA group when one has enough free.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tangram.core.managers.base import CountOperator, Manager, Operator, Scratch
from tangram.spec import Action, Allocation, Demand, InvalidAction


@dataclass(slots=True)
class CpuNode:
    name: str
    numa: list[list[int]]
    memory_gb: float
    free: list[list[int]] = field(default_factory=list)  # per NUMA group, sorted
    free_count: int = 0
    memory_free: float = 0.0
    cores: int = 0

    def __post_init__(self) -> None:
        self.free = [sorted(g) for g in self.numa]
        self.cores = self.free_count = sum(len(g) for g in self.numa)
        self.memory_free = self.memory_gb


class CpuManager(Manager):
    kind = "cpu"
    unit = "cores"

    def __init__(self, name: str, nodes: Sequence[CpuNode]) -> None:
        super().__init__(name)
        if not nodes:
            raise ValueError(f"cpu pool {name!r} needs at least one node")
        self.nodes = {n.name: n for n in nodes}
        self._group_of = {n.name: {c: gi for gi, g in enumerate(n.numa) for c in g} for n in nodes}
        # trajectory -> (node, reserved memory)
        self.pins: dict[str, tuple[str, float]] = {}
        self._max_cores = max(n.cores for n in nodes)
        self._max_memory = max(n.memory_gb for n in nodes)

    # ---- validation -----------------------------------------------------------------
    def feasible(self, action: Action, demand: Demand) -> tuple[int, ...]:
        pin = self.pins.get(action.trajectory)
        if pin is not None:
            node = self.nodes[pin[0]]
            if demand.min > node.cores:
                raise InvalidAction(
                    f"demand {self.name}={demand.to_wire()} can never fit: trajectory "
                    f"{action.trajectory!r} is pinned to node {node.name!r}, which has "
                    f"{node.cores} cores; ask for at most {node.cores} or close the trajectory"
                )
            return demand.upto(node.cores)
        if demand.min > self._max_cores:
            raise InvalidAction(
                f"demand {self.name}={demand.to_wire()} can never fit: the largest node of "
                f"pool {self.name!r} has {self._max_cores} cores"
            )
        if action.memory_gb > self._max_memory:
            raise InvalidAction(
                f"trajectory memory {action.memory_gb:g} GB can never fit: the largest node "
                f"of pool {self.name!r} has {self._max_memory:g} GB"
            )
        if action.memory_gb < 0:
            raise InvalidAction(f"memory_gb must not be negative (got {action.memory_gb:g})")
        if not any(
            n.cores >= demand.min and n.memory_gb >= action.memory_gb for n in self.nodes.values()
        ):
            raise InvalidAction(
                f"no node of pool {self.name!r} has both {demand.min} cores and "
                f"{action.memory_gb:g} GB; nodes: "
                + ", ".join(
                    f"{n.name} ({n.cores} cores, {n.memory_gb:g} GB)" for n in self.nodes.values()
                )
            )
        # Only nodes with the trajectory's memory can ever host it.
        most = self._max_cores
        if action.memory_gb > 0:
            most = max(n.cores for n in self.nodes.values() if n.memory_gb >= action.memory_gb)
        return demand.upto(most)

    # ---- a round ----------------------------------------------------------------------
    def begin_round(self, now: float) -> Scratch:
        return _CpuScratch(self)

    def choose_node(
        self,
        memory: float,
        amount: int,
        free: dict[str, int],
        mem: dict[str, float],
        skip: set[str],
    ) -> str | None:
        """Pick a node for a new trajectory: enough free cores and memory, balancing load
        by keeping the scarcer of the two (cores, memory) as free as possible."""
        best: str | None = None
        best_score = -1.0
        for name, node in self.nodes.items():
            if name in skip or free[name] < amount or mem[name] < memory:
                continue
            core_left = (free[name] - amount) / node.cores
            mem_left = (mem[name] - memory) / node.memory_gb if node.memory_gb else 1.0
            score = min(core_left, mem_left)
            if score > best_score:
                best, best_score = name, score
        return best

    def allocate(
        self, action: Action, amount: int, part: Hashable, now: float
    ) -> Allocation | None:
        assert isinstance(part, str)
        node = self.nodes[part]
        pin = self.pins.get(action.trajectory)
        if pin is not None and pin[0] != part:
            return None
        if node.free_count < amount:
            return None
        if pin is None:
            if node.memory_free < action.memory_gb:
                return None
            node.memory_free -= action.memory_gb
            self.pins[action.trajectory] = (part, action.memory_gb)
        self.tick(now)
        cores = self._pick(node, amount)
        node.free_count -= amount
        return Allocation(amount=amount, node=part, units=tuple(cores), pinned=pin is None)

    @staticmethod
    def _pick(node: CpuNode, amount: int) -> list[int]:
        # Best fit: the NUMA group with the fewest free cores that still holds them all,
        # which keeps large groups whole for large requests.
        group, size = None, 1 << 30
        for g in node.free:
            n = len(g)
            if amount <= n < size:
                group, size = g, n
        if group is not None:
            cores = group[:amount]
            del group[:amount]
            return cores
        cores = []
        for group in sorted(node.free, key=len, reverse=True):
            n = amount - len(cores)
            cores.extend(group[:n])
            del group[:n]
            if len(cores) == amount:
                break
        return sorted(cores)

    def release(
        self, action: Action, alloc: Allocation, now: float, usage: dict[str, Any] | None
    ) -> None:
        assert alloc.node is not None
        self.tick(now)
        node = self.nodes[alloc.node]
        groups = self._group_of[alloc.node]
        for c in alloc.units:
            bisect.insort(node.free[groups[c]], c)
        node.free_count += alloc.amount

    def claim(self, action: Action, alloc: Allocation, now: float) -> None:
        node = self.nodes.get(alloc.node or "")
        if node is None:
            raise ValueError(f"pool {self.name!r} has no node {alloc.node!r}")
        groups = self._group_of[node.name]
        if any(c not in groups or c not in node.free[groups[c]] for c in alloc.units):
            raise ValueError(f"cores {list(alloc.units)} of {node.name} are not all free")
        pin = self.pins.get(action.trajectory)
        if pin is not None and pin[0] != node.name:
            raise ValueError(f"trajectory {action.trajectory!r} is pinned to {pin[0]}")
        self.tick(now)
        for c in alloc.units:
            node.free[groups[c]].remove(c)
        node.free_count -= len(alloc.units)
        if pin is None:
            node.memory_free -= action.memory_gb
            self.pins[action.trajectory] = (node.name, action.memory_gb)

    def rollback(self, action: Action, alloc: Allocation, now: float) -> None:
        self.release(action, alloc, now, None)
        if alloc.pinned:
            self.close_trajectory(action.trajectory)

    def why(self, action: Action, amount: int, now: float) -> dict[str, Any] | None:
        pin = self.pins.get(action.trajectory)
        if pin is not None:
            node = self.nodes[pin[0]]
            if node.free_count >= amount:
                return None
            return {
                "reason": "insufficient_units",
                "message": f"node {node.name} has {node.free_count} of the {amount} cores it "
                "needs free (its trajectory is pinned there)",
                "node": node.name,
                "needs": amount,
                "free": node.free_count,
            }
        need = action.memory_gb
        hosts = [n for n in self.nodes.values() if n.memory_free >= need]
        if not hosts:
            free = ", ".join(f"{n.name} {n.memory_free:g} GB" for n in self.nodes.values())
            return {
                "reason": "memory",
                "message": f"no node of pool {self.name!r} has the trajectory's {need:g} GB "
                f"of memory free (free: {free}); it frees when other trajectories close",
                "needs_memory_gb": need,
            }
        best = max(hosts, key=lambda n: n.free_count)
        if best.free_count >= amount:
            return None
        where = "no node" if need <= 0 else f"no node with its {need:g} GB of memory free"
        return {
            "reason": "insufficient_units",
            "message": f"{where} has {amount} cores free; the most is node {best.name} "
            f"with {best.free_count}",
            "node": best.name,
            "needs": amount,
            "free": best.free_count,
        }

    def pin_of(self, trajectory: str) -> str | None:
        pin = self.pins.get(trajectory)
        return pin[0] if pin is not None else None

    def close_trajectory(self, trajectory: str) -> str | None:
        pin = self.pins.pop(trajectory, None)
        if pin is None:
            return None
        self.nodes[pin[0]].memory_free += pin[1]
        return pin[0]

    # ---- capacity ---------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        return {n.name: (n.cores, n.cores - n.free_count) for n in self.nodes.values()}

    def topology(self) -> dict[str, Any]:
        return {
            n.name: {
                "cores": n.cores,
                "numa": [len(g) for g in n.numa],
                "memory_gb": n.memory_gb,
                "memory_free_gb": n.memory_free,
                "free_cores": n.free_count,
            }
            for n in self.nodes.values()
        }

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot()
        snap["trajectories"] = len(self.pins)
        return snap


class _CpuScratch(Scratch):
    """Free cores and memory per node for one round. Partitions are nodes."""

    __slots__ = ("blocked_nodes", "free", "mem", "mgr", "pins", "takes", "waiting")

    def __init__(self, mgr: CpuManager) -> None:
        self.mgr = mgr
        self.free = {n.name: n.free_count for n in mgr.nodes.values()}
        self.mem = {n.name: n.memory_free for n in mgr.nodes.values()}
        self.pins: dict[str, str] = {}
        self.blocked_nodes: set[str] = set()
        self.waiting: set[str] = set()  # unpinned trajectories with an action waiting
        self.takes: dict[str, tuple[str, int]] = {}

    def _node_of(self, action: Action) -> str | None:
        pin = self.mgr.pins.get(action.trajectory)
        if pin is not None:
            return pin[0]
        return self.pins.get(action.trajectory)

    def fit(self, action: Action, amount: int) -> Hashable | None:
        node = self._node_of(action)
        if node is None:
            node = self.mgr.choose_node(
                action.memory_gb, amount, self.free, self.mem, self.blocked_nodes
            )
            if node is None:
                return None
            self.mem[node] -= action.memory_gb
            self.pins[action.trajectory] = node
        elif self.free[node] < amount:
            return None
        self.free[node] -= amount
        self.takes[action.id] = (node, amount)
        return node

    def unfit(self, action: Action, amount: int, part: Hashable) -> None:
        assert isinstance(part, str)
        self.free[part] += amount
        self.takes.pop(action.id, None)
        if self.pins.get(action.trajectory) == part:
            del self.pins[action.trajectory]
            self.mem[part] += action.memory_gb

    def blocked(self, action: Action) -> bool:
        node = self._node_of(action)
        if node is None:
            # A trajectory whose earlier action waits, unpinned, must not get ahead of
            # it: its first grant would pin it, maybe where the earlier one cannot fit.
            if action.trajectory in self.waiting:
                return True
            # A new trajectory may still go to any node not blocked.
            return len(self.blocked_nodes) == len(self.free)
        return node in self.blocked_nodes

    def block(self, action: Action) -> None:
        node = self._node_of(action)
        if node is not None:
            self.blocked_nodes.add(node)
            return
        # A new trajectory waits for cores on the nodes that have the memory to host it:
        # nothing may take those cores ahead of it. Nodes without that memory stay open,
        # since only their trajectories ending can free it (blocking them too would
        # deadlock the pool).
        need = action.memory_gb
        self.blocked_nodes.update(n for n, m in self.mem.items() if m >= need)
        self.waiting.add(action.trajectory)

    @property
    def saturated(self) -> bool:
        return len(self.blocked_nodes) == len(self.free)

    def partition_of(self, action: Action) -> Hashable | None:
        node = self._node_of(action)
        if node is None and len(self.free) == 1:
            return next(iter(self.free))
        return node

    def operator(self, part: Hashable, group: set[str]) -> Operator:
        assert isinstance(part, str)
        back = sum(n for aid, (node, n) in self.takes.items() if node == part and aid in group)
        return CountOperator(self.free[part] + back)
