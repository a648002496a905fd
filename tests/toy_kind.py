"""A toy resource kind, as a plugin would add one: interchangeable units counted per
node (say, licences of a tool installed on each node). Everything the kind needs is in
this module; registering it is one line (``tangram.kinds.register(KIND)``)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Literal

from pydantic import Field

from tangram.core.managers.base import CountOperator, Manager, Operator, Scratch
from tangram.kinds.base import Kind, Strict
from tangram.spec import Action, Allocation, Demand, InvalidAction


class ToyManager(Manager):
    kind = "toy"
    unit = "licences"

    def __init__(self, name: str, nodes: dict[str, int]) -> None:
        super().__init__(name)
        self.size = dict(nodes)
        self.free = {n: list(range(k)) for n, k in nodes.items()}

    def feasible(self, action: Action, demand: Demand) -> tuple[int, ...]:
        most = max(self.size.values())
        fits = demand.upto(most)
        if not fits:
            raise InvalidAction(f"pool {self.name!r}: at most {most} licences on one node")
        return fits

    def begin_round(self, now: float) -> Scratch:
        self.tick(now)
        return _ToyScratch({n: len(f) for n, f in self.free.items()})

    def allocate(self, action: Action, amount: int, part: Hashable, now: float) -> Allocation:
        self.tick(now)
        node = str(part)
        units, self.free[node] = self.free[node][:amount], self.free[node][amount:]
        return Allocation(amount, node, tuple(units))

    def release(
        self, action: Action, alloc: Allocation, now: float, usage: dict[str, Any] | None
    ) -> None:
        self.tick(now)
        self.free[str(alloc.node)] = sorted(self.free[str(alloc.node)] + list(alloc.units))

    def claim(self, action: Action, alloc: Allocation, now: float) -> None:
        free = self.free.get(str(alloc.node), [])
        if not set(alloc.units) <= set(free):
            raise ValueError("not free")
        self.free[str(alloc.node)] = [u for u in free if u not in alloc.units]

    def usage(self) -> dict[str, tuple[int, int]]:
        return {n: (k, k - len(self.free[n])) for n, k in self.size.items()}


class _ToyScratch(Scratch):
    def __init__(self, free: dict[str, int]) -> None:
        self.left = free
        self.takes: dict[str, tuple[str, int]] = {}
        self.waiting = False

    def fit(self, action: Action, amount: int) -> Hashable | None:
        node = max(self.left, key=lambda n: self.left[n])
        if self.left[node] < amount:
            return None
        self.left[node] -= amount
        self.takes[action.id] = (node, amount)
        return node

    def unfit(self, action: Action, amount: int, part: Hashable) -> None:
        self.left[str(part)] += amount
        self.takes.pop(action.id, None)

    def blocked(self, action: Action) -> bool:
        return self.waiting

    def block(self, action: Action) -> None:
        self.waiting = True

    @property
    def saturated(self) -> bool:
        return self.waiting

    def operator(self, part: Hashable, group: set[str]) -> Operator:
        back = sum(k for a, (n, k) in self.takes.items() if n == part and a in group)
        return CountOperator(self.left[str(part)] + back)


class ToyPoolConfig(Strict):
    kind: Literal["toy"]
    nodes: dict[str, int] = Field(..., min_length=1, description="licences per node")


def build(name: str, cfg: ToyPoolConfig) -> ToyManager:
    return ToyManager(name, cfg.nodes)


KIND = Kind("toy", ToyManager, ToyPoolConfig, build)
