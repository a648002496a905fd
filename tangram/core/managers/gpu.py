"""The GPU manager: buddy chunks, at most one action per GPU, a per-GPU service cache.

GPUs are handed out as aligned chunks of 1, 2, 4, 8... GPUs inside one node: to get k GPUs
take the smallest free chunk of size >= k, splitting larger ones buddy-style, and among
equal chunks prefer one where the service (at that parallelism) is already resident.
A service that is not resident is restored from its host copy, evicting the least
recently used residents of each GPU until it fits; nothing is written back.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from tangram.core.managers.base import Manager, MetricFamily, Operator, Scratch
from tangram.spec import Action, Allocation, Demand, InvalidAction, Resident

Variant = tuple[str, int]  # (service, parallelism)


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    memory_gb: float  # the whole model's footprint; a variant over k GPUs needs memory_gb / k each
    restore_seconds: float
    parallelism: tuple[int, ...] = (1,)

    def footprint(self, k: int) -> float:
        return self.memory_gb / k


@dataclass(slots=True)
class GpuNode:
    name: str
    gpus: int
    memory_gb: float  # per GPU


def sizes_up_to(n: int) -> tuple[int, ...]:
    out, s = [], 1
    while s <= n:
        out.append(s)
        s *= 2
    return tuple(out)


@functools.lru_cache(maxsize=65536)
def take_chunk(counts: tuple[int, ...], k: int) -> tuple[int, ...] | None:
    """Buddy best fit on free-chunk counts (index i counts chunks of 2**i GPUs)."""
    i = k.bit_length() - 1
    for s in range(i, len(counts)):
        if counts[s]:
            out = list(counts)
            out[s] -= 1
            for t in range(i, s):  # splitting 2**s leaves one free chunk of each 2**t
                out[t] += 1
            return tuple(out)
    return None


@functools.lru_cache(maxsize=65536)
def chunk_units(counts: tuple[int, ...]) -> int:
    return sum(c << i for i, c in enumerate(counts))


class ChunkOperator(Operator):
    """The paper's GPU operator: the state is the count of free chunks per size."""

    def __init__(self, counts: tuple[int, ...]) -> None:
        self.counts = counts

    def start(self) -> tuple[int, ...]:
        return self.counts

    def take(self, state: tuple[int, ...], k: int) -> tuple[int, ...] | None:
        return take_chunk(state, k)

    def units(self, state: tuple[int, ...]) -> int:
        return chunk_units(state)


class GpuManager(Manager):
    kind = "gpu"
    has_extra_cost = True
    runs_services = True
    unit = "GPUs"
    metrics = (
        MetricFamily("gpu_restores", "counter", "Grants that restored a service."),
        MetricFamily("gpu_evictions", "counter", "Resident services evicted."),
        MetricFamily("gpu_cache_hits", "counter", "Grants whose service was resident."),
        MetricFamily(
            "gpu_restore_seconds", "counter", "Restore time paid (estimated or measured)."
        ),
    )

    def __init__(
        self, name: str, nodes: Sequence[GpuNode], services: Sequence[Service] = ()
    ) -> None:
        super().__init__(name)
        if not nodes:
            raise ValueError(f"gpu pool {name!r} needs at least one node")
        self.nodes = {n.name: n for n in nodes}
        for n in nodes:
            if n.gpus & (n.gpus - 1):
                raise ValueError(f"gpu node {n.name!r}: GPUs per node must be a power of two")
        self.services = {s.name: s for s in services}
        self.node_gpus = max(n.gpus for n in nodes)
        self.sizes = sizes_up_to(self.node_gpus)
        # node -> size -> free chunk starts
        self.free: dict[str, dict[int, set[int]]] = {
            n.name: {s: set() for s in self.sizes} for n in nodes
        }
        for n in nodes:
            self.free[n.name][n.gpus].add(0)
        self.busy: dict[str, list[bool]] = {n.name: [False] * n.gpus for n in nodes}
        # Per GPU: resident (service, k, chunk start) in LRU order with footprint.
        self.cache: dict[str, list[OrderedDict[tuple[str, int, int], float]]] = {
            n.name: [OrderedDict() for _ in range(n.gpus)] for n in nodes
        }
        self.mem_used: dict[str, list[float]] = {n.name: [0.0] * n.gpus for n in nodes}
        self.resident: dict[Variant, set[tuple[str, int]]] = {}
        self.in_use = 0
        self._extra_memo: dict[tuple[str, int], float] = {}
        self.restores = 0
        self.evictions = 0
        self.cache_hits = 0
        self.restore_seconds_total = 0.0

    # ---- validation -----------------------------------------------------------------
    def feasible(self, action: Action, demand: Demand) -> tuple[int, ...]:
        amounts = demand.amounts()
        sizes = set(self.sizes)
        ok = tuple(a for a in amounts if a in sizes)
        if not ok:
            raise InvalidAction(
                f"demand {self.name}={demand.to_wire()} can never fit: GPUs are granted in "
                f"aligned chunks of {', '.join(map(str, self.sizes))} inside one node"
            )
        if action.service is not None:
            svc = self.services.get(action.service)
            if svc is None:
                known = ", ".join(sorted(self.services)) or "none"
                raise InvalidAction(
                    f"service {action.service!r} is unknown to GPU pool {self.name!r}; "
                    f"known services: {known}",
                    "unknown_service",
                )
            allowed = tuple(a for a in ok if a in svc.parallelism)
            if not allowed:
                raise InvalidAction(
                    f"service {svc.name!r} runs with {list(svc.parallelism)} GPUs but the "
                    f"demand {self.name}={demand.to_wire()} allows {list(ok)}"
                )
            mem = min(n.memory_gb for n in self.nodes.values())
            fitting = tuple(a for a in allowed if svc.footprint(a) <= mem)
            if not fitting:
                raise InvalidAction(
                    f"service {svc.name!r} needs {svc.footprint(allowed[-1]):g} GB per GPU "
                    f"with {allowed[-1]} GPUs but GPUs of pool {self.name!r} have {mem:g} GB"
                )
            ok = fitting
        return ok

    # ---- the cache ----------------------------------------------------------------------
    def _chunk_free(self, node: str, start: int, k: int) -> bool:
        busy = self.busy[node]
        return not any(busy[start : start + k])

    def is_resident(self, service: str, k: int, node: str, start: int) -> bool:
        return (node, start) in self.resident.get((service, k), ())

    def extra_cost(self, action: Action, amount: int) -> float:
        """The restore time a grant of ``amount`` GPUs would pay now: the same choice of
        chunk as ``allocate`` makes, so the scheduler plans with what will happen."""
        if action.service is None:
            return 0.0
        key = (action.service, amount)
        cost = self._extra_memo.get(key)
        if cost is None:  # the same answer until the free chunks or the cache change
            pick = self._choose(amount, action.service)
            warm = pick is not None and self.is_resident(action.service, amount, pick[0], pick[2])
            cost = 0.0 if warm else self.services[action.service].restore_seconds
            self._extra_memo[key] = cost
        return cost

    def observe(self, what: str, key: str, value: float) -> None:
        if what != "restore_seconds" or key not in self.services:
            super().observe(what, key, value)
        self.observe_restore(key, value)

    def samples(self, now: float) -> list[tuple[str, tuple[str, ...], float]]:
        return [
            ("gpu_restores", (), self.restores),
            ("gpu_evictions", (), self.evictions),
            ("gpu_cache_hits", (), self.cache_hits),
            ("gpu_restore_seconds", (), self.restore_seconds_total),
        ]

    def counters(self) -> dict[str, float]:
        out = {
            "restores": float(self.restores),
            "evictions": float(self.evictions),
            "cache_hits": float(self.cache_hits),
            "restore_seconds_total": self.restore_seconds_total,
        }
        for svc in self.services.values():
            out[f"restore_seconds:{svc.name}"] = svc.restore_seconds
        return out

    def observe_restore(self, service: str, seconds: float) -> None:
        """Feed a measured restore time back into the cost model (moving average)."""
        svc = self.services[service]
        self._extra_memo.clear()
        self.restore_seconds_total += seconds
        new = 0.8 * svc.restore_seconds + 0.2 * seconds
        self.services[service] = Service(svc.name, svc.memory_gb, new, svc.parallelism)

    def _evict(self, node: str, entry: tuple[str, int, int]) -> None:
        service, k, start = entry
        self._extra_memo.clear()
        for g in range(start, start + k):
            fp = self.cache[node][g].pop(entry, None)
            if fp is not None:
                self.mem_used[node][g] -= fp
        self.resident.get((service, k), set()).discard((node, start))
        self.evictions += 1

    def _place(self, svc: Service, k: int, node: str, start: int) -> tuple[bool, list[Resident]]:
        """Make the variant resident on the chunk; return (restore needed, what it evicted)."""
        entry = (svc.name, k, start)
        caches = self.cache[node]
        if self.is_resident(svc.name, k, node, start):
            for g in range(start, start + k):
                caches[g].move_to_end(entry)
            self.cache_hits += 1
            return False, []
        fp = svc.footprint(k)
        cap = self.nodes[node].memory_gb
        evicted: list[Resident] = []
        for g in range(start, start + k):
            while self.mem_used[node][g] + fp > cap + 1e-9 and caches[g]:
                victim = next(iter(caches[g]))
                self._evict(node, victim)
                evicted.append(Resident(victim[0], victim[1], node, victim[2]))
        for g in range(start, start + k):
            caches[g][entry] = fp
            self.mem_used[node][g] += fp
        self.resident.setdefault((svc.name, k), set()).add((node, start))
        self.restores += 1
        return True, evicted

    # ---- a round ----------------------------------------------------------------------
    def counts(self) -> tuple[int, ...]:
        out = [0] * len(self.sizes)
        for chunks in self.free.values():
            for i, s in enumerate(self.sizes):
                out[i] += len(chunks[s])
        return tuple(out)

    def begin_round(self, now: float) -> Scratch:
        return _GpuScratch(self.counts())

    def why(self, action: Action, amount: int, now: float) -> dict[str, Any] | None:
        if take_chunk(self.counts(), amount) is not None:
            return None
        free = {n: b.count(False) for n, b in self.busy.items()}
        where = ", ".join(f"{n} {k}" for n, k in free.items())
        return {
            "reason": "insufficient_units",
            "message": f"no node of pool {self.name!r} has an aligned chunk of {amount} "
            f"free GPUs (free GPUs per node: {where})",
            "needs": amount,
            "free": max(free.values()),
        }

    def _choose(self, amount: int, service: str | None) -> tuple[str, int, int, int] | None:
        """(node, free chunk start, sub-chunk start, chunk size) for ``amount`` GPUs: the
        smallest free chunk that holds them; among equal ones, and their aligned sub-chunks,
        one where the service is resident, then the lowest position."""
        size = next(
            (s for s in self.sizes if s >= amount and any(self.free[n][s] for n in self.free)),
            None,
        )
        if size is None:
            return None
        best: tuple[int, int, int, int, str] | None = None
        for n_i, (node_name, chunks) in enumerate(self.free.items()):
            for first in chunks[size]:
                for sub in range(first, first + size, amount):
                    warm = service is not None and self.is_resident(service, amount, node_name, sub)
                    rank = (0 if warm else 1, n_i, first, sub, node_name)
                    if best is None or rank < best:
                        best = rank
        assert best is not None
        return best[4], best[2], best[3], size

    def allocate(
        self, action: Action, amount: int, part: Hashable, now: float
    ) -> Allocation | None:
        pick = self._choose(amount, action.service)
        if pick is None:
            return None
        node, start, sub, size = pick
        svc = self.services.get(action.service) if action.service else None
        self.tick(now)
        self._take(node, start, size, sub, amount)
        restore, evicted = False, list[Resident]()
        if svc is not None:
            restore, evicted = self._place(svc, amount, node, sub)
            if restore:
                self.restore_seconds_total += svc.restore_seconds
        return Allocation(
            amount=amount,
            node=node,
            units=tuple(range(sub, sub + amount)),
            restore=restore,
            evicts=tuple(evicted),
        )

    def _take(self, node: str, start: int, size: int, sub: int, amount: int) -> None:
        """Take GPUs sub..sub+amount out of the free chunk (start, size) that holds them."""
        self._extra_memo.clear()
        chunks = self.free[node]
        chunks[size].discard(start)
        s = size
        while s > amount:  # split, keeping the half that holds ``sub``
            s //= 2
            lo, hi = start, start + s
            if sub >= hi:
                chunks[s].add(lo)
                start = hi
            else:
                chunks[s].add(hi)
        busy = self.busy[node]
        for g in range(sub, sub + amount):
            busy[g] = True
        self.in_use += amount

    def claim(self, action: Action, alloc: Allocation, now: float) -> None:
        if alloc.node not in self.nodes or not alloc.units:
            raise ValueError(f"pool {self.name!r} has no node {alloc.node!r}")
        sub, amount = int(alloc.units[0]), alloc.amount
        for size in self.sizes:
            start = sub - sub % size
            if size >= amount and start in self.free[alloc.node][size]:
                self.tick(now)
                self._take(alloc.node, start, size, sub, amount)
                svc = self.services.get(action.service) if action.service else None
                if svc is not None and not self.is_resident(svc.name, amount, alloc.node, sub):
                    self._place(svc, amount, alloc.node, sub)
                return
        raise ValueError(f"GPUs {list(alloc.units)} of {alloc.node} are not free")

    def rollback(self, action: Action, alloc: Allocation, now: float) -> None:
        self.release(action, alloc, now, None)
        if alloc.restore and action.service is not None:
            # It was never restored; what it evicted stays evicted (nothing to write back).
            self._evict(alloc.node or "", (action.service, alloc.amount, alloc.units[0]))
            self.evictions -= 1
            self.restores -= 1

    def failed(self, action: Action, alloc: Allocation) -> None:
        # The restore this grant asked for may have failed: do not count the service as
        # resident there (the executor restores whenever its own copy is missing, so at
        # worst the next call pays a restore it did not need).
        svc, node = action.service, alloc.node
        if (
            alloc.restore
            and svc is not None
            and node is not None
            and self.is_resident(svc, alloc.amount, node, alloc.units[0])
        ):
            self._evict(node, (svc, alloc.amount, alloc.units[0]))
            self.evictions -= 1  # not an eviction the cache chose

    def serves(self, service: str) -> bool:
        return service in self.services

    def held_cost(self, action: Action, alloc: Allocation) -> float:
        if alloc.restore and action.service is not None:
            return self.services[action.service].restore_seconds
        return 0.0

    def release(
        self, action: Action, alloc: Allocation, now: float, usage: dict[str, Any] | None
    ) -> None:
        assert alloc.node is not None
        self.tick(now)
        self._extra_memo.clear()
        node, start, size = alloc.node, alloc.units[0], alloc.amount
        busy = self.busy[node]
        for g in alloc.units:
            busy[g] = False
        self.in_use -= size
        chunks = self.free[node]
        top = self.nodes[node].gpus
        while size < top:  # coalesce with the buddy while it is free
            buddy = start ^ size
            if buddy in chunks[size]:
                chunks[size].discard(buddy)
                start = min(start, buddy)
                size *= 2
            else:
                break
        chunks[size].add(start)

    # ---- capacity ---------------------------------------------------------------------
    def usage(self) -> dict[str, tuple[int, int]]:
        return {n: (self.nodes[n].gpus, sum(b)) for n, b in self.busy.items()}

    def topology(self) -> dict[str, Any]:
        return {
            n: {
                "gpus": node.gpus,
                "memory_gb": node.memory_gb,
                "free_chunks": {str(s): sorted(self.free[n][s]) for s in self.sizes},
                "resident": [sorted({f"{e[0]}/tp{e[1]}@{e[2]}" for e in c}) for c in self.cache[n]],
            }
            for n, node in self.nodes.items()
        }


class _GpuScratch(Scratch):
    """Free chunk counts for one round; one partition (the whole pool)."""

    __slots__ = ("_blocked", "counts", "start", "takes")

    def __init__(self, counts: tuple[int, ...]) -> None:
        self.start = counts
        self.counts = counts
        self.takes: list[tuple[str, int]] = []
        self._blocked = False

    def fit(self, action: Action, amount: int) -> Hashable | None:
        nxt = take_chunk(self.counts, amount)
        if nxt is None:
            return None
        self.counts = nxt
        self.takes.append((action.id, amount))
        return ""

    def unfit(self, action: Action, amount: int, part: Hashable) -> None:
        self.takes = [t for t in self.takes if t[0] != action.id]
        counts: tuple[int, ...] | None = self.start
        for _, k in self.takes:
            assert counts is not None
            counts = take_chunk(counts, k)
        assert counts is not None
        self.counts = counts

    def blocked(self, action: Action) -> bool:
        return self._blocked

    def block(self, action: Action) -> None:
        self._blocked = True

    @property
    def saturated(self) -> bool:
        return self._blocked

    def partition_of(self, action: Action) -> Hashable | None:
        return ""

    def operator(self, part: Hashable, group: set[str]) -> Operator:
        counts: tuple[int, ...] | None = self.start
        for aid, k in self.takes:
            if aid not in group:
                assert counts is not None
                counts = take_chunk(counts, k)
        assert counts is not None
        return ChunkOperator(counts)
