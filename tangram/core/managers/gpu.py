"""The GPU manager: buddy chunks, a per-GPU service cache, request slots per instance.

GPUs are handed out as aligned chunks of 1, 2, 4, 8... GPUs inside one node: to get k GPUs
take the smallest free chunk of size >= k, splitting larger ones buddy-style, and among
equal chunks prefer one where the service (at that parallelism) is already resident.
A service that is not resident is restored from its host copy, evicting the least
recently used residents of each GPU until it fits; nothing is written back.

Request slots. An inference engine batches concurrent requests, so a service may accept
up to ``max_concurrency`` actions at once on one running instance (a variant on a chunk
with at least one action in flight). A new action of that variant joins a running
instance with a free slot before it takes GPUs of its own: joining costs no GPUs and no
restore, and an action waiting for GPUs is never overtaken for them. The chunk stays
busy until the instance's last action ends. Every action on an instance carries the
instance's ``epoch`` (the fencing token of the lease that opened it), so an executor's
fence orders instances, not the actions sharing one (tangram.executors.fencing).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
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
    # Actions one running instance serves at once (an engine's concurrent requests).
    max_concurrency: int = 1
    # The batching curve: (concurrent actions, latency multiplier) points, ascending;
    # latency at n in between is interpolated linearly (the simulator's model of an
    # engine that batches; the live broker measures instead).
    batching: tuple[tuple[int, float], ...] = ()
    # ``on-demand``: an instance starts at its first grant on a chunk; ``pre-launched``:
    # one sleeps on every chunk from the start, its weights held in host RAM for good.
    launch: str = "on-demand"
    # A wake whose weights were dropped (a level-2 sleep, or a first start): None, the
    # same as ``restore_seconds`` (a wake from host RAM).
    reload_seconds: float | None = None

    @property
    def reload(self) -> float:
        return self.restore_seconds if self.reload_seconds is None else self.reload_seconds

    def footprint(self, k: int) -> float:
        return self.memory_gb / k

    def latency_factor(self, n: int) -> float:
        """How much longer one request takes with ``n`` in flight on its instance."""
        pts = self.batching
        if n <= 1 or not pts:
            return 1.0
        prev_n, prev_f = 1, 1.0
        for m, f in pts:
            if n <= m:
                if m == prev_n:
                    return f
                return prev_f + (f - prev_f) * (n - prev_n) / (m - prev_n)
            prev_n, prev_f = m, f
        return prev_f


@dataclass(slots=True)
class Instance:
    """A variant on a chunk with actions in flight: its chunk is busy until it has none."""

    service: str
    k: int
    active: int
    epoch: int = 0  # the fencing token of the lease that opened it (0: not yet granted)


@dataclass(slots=True)
class GpuNode:
    name: str
    gpus: int
    memory_gb: float  # per GPU
    # Host RAM for sleeping engines' weights; None: not accounted (every evicted variant
    # sleeps with its weights kept, and every restore costs ``restore_seconds``).
    host_memory_gb: float | None = None


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
        MetricFamily(
            "gpu_slot_joins", "counter", "Grants that joined a running instance's free slot."
        ),
    )
    shares_units = True

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
        # Services that batch: their slots per instance.
        self.batching = {s.name: s.max_concurrency for s in services if s.max_concurrency > 1}
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
        # Host RAM per node: what pre-launched instances reserve, and the on-demand
        # variants asleep with their weights there (level 1), oldest first.
        self.host_reserved = {n.name: self.prelaunched_gb(n) for n in nodes}
        self.sleeping: dict[str, OrderedDict[tuple[str, int, int], float]] = {
            n.name: OrderedDict() for n in nodes
        }
        self.host_used = {n.name: 0.0 for n in nodes}
        self.resident: dict[Variant, set[tuple[str, int]]] = {}
        # Running instances by (node, chunk start), and free request slots per variant.
        self.instances: dict[tuple[str, int], Instance] = {}
        self.slots: dict[Variant, int] = {}
        # Per action on an instance: the actions in flight there when it started.
        self.started_with: dict[str, int] = {}
        self.in_use = 0
        self._extra_memo: dict[tuple[str, int], float] = {}
        self.restores = 0
        self.evictions = 0
        self.cache_hits = 0
        self.restore_seconds_total = 0.0
        self.joins = 0

    def prelaunched_gb(self, node: GpuNode) -> float:
        """Host RAM the pre-launched services hold on ``node``: one sleeping instance's
        weights per chunk of each of their parallelisms."""
        return sum(
            svc.memory_gb * (node.gpus // k)
            for svc in self.services.values()
            if svc.launch == "pre-launched"
            for k in svc.parallelism
            if k <= node.gpus
        )

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
        if self.slots.get(key):
            return 0.0  # it would join a running instance
        cost = self._extra_memo.get(key)
        if cost is None:  # the same answer until the free chunks or the cache change
            pick = self._choose(amount, action.service)
            svc = self.services[action.service]
            if pick is None:
                cost = svc.restore_seconds
            elif self.is_resident(svc.name, amount, pick[0], pick[2]):
                cost = 0.0
            else:
                cost = self._wake_cost(svc, amount, pick[0], pick[2])
            self._extra_memo[key] = cost
        return cost

    def observe(self, what: str, key: str, value: float) -> None:
        if what not in ("restore_seconds", "reload_seconds") or key not in self.services:
            super().observe(what, key, value)
        self.observe_restore(key, value, reload=what == "reload_seconds")

    def samples(self, now: float) -> list[tuple[str, tuple[str, ...], float]]:
        return [
            ("gpu_restores", (), self.restores),
            ("gpu_evictions", (), self.evictions),
            ("gpu_cache_hits", (), self.cache_hits),
            ("gpu_restore_seconds", (), self.restore_seconds_total),
            ("gpu_slot_joins", (), self.joins),
        ]

    def counters(self) -> dict[str, float]:
        out = {
            "restores": float(self.restores),
            "evictions": float(self.evictions),
            "cache_hits": float(self.cache_hits),
            "restore_seconds_total": self.restore_seconds_total,
            "slot_joins": float(self.joins),
        }
        for svc in self.services.values():
            out[f"restore_seconds:{svc.name}"] = svc.restore_seconds
        return out

    def observe_restore(self, service: str, seconds: float, *, reload: bool = False) -> None:
        """Feed a measured restore time back into the cost model (moving average): a wake
        from host RAM, or with ``reload`` one whose weights were reloaded."""
        svc = self.services[service]
        self._extra_memo.clear()
        self.restore_seconds_total += seconds
        if reload:
            new = 0.8 * svc.reload + 0.2 * seconds
            self.services[service] = dataclasses.replace(svc, reload_seconds=new)
        else:
            new = 0.8 * svc.restore_seconds + 0.2 * seconds
            self.services[service] = dataclasses.replace(svc, restore_seconds=new)

    # ---- host RAM: where evicted variants sleep ---------------------------------------
    def _wake_cost(self, svc: Service, k: int, node: str, start: int) -> float:
        """What making the (non-resident) variant resident on the chunk costs: a wake
        from host RAM, or a reload when its weights are not there."""
        if self.nodes[node].host_memory_gb is None or svc.launch == "pre-launched":
            return svc.restore_seconds
        if (svc.name, k, start) in self.sleeping[node]:
            return svc.restore_seconds
        return svc.reload

    def _sleep(self, node: str, entry: tuple[str, int, int]) -> int:
        """An evicted variant goes to sleep: its weights stay in host RAM (level 1) when
        they fit beside what is there, else they are dropped (level 2). Returns the level
        the executor is told (0: host RAM not accounted, its own default)."""
        host = self.nodes[node].host_memory_gb
        if host is None:
            return 0
        svc = self.services[entry[0]]
        if svc.launch == "pre-launched":
            return 1  # its host RAM is reserved
        used = self.host_reserved[node] + self.host_used[node]
        if used + svc.memory_gb > host + 1e-9:
            return 2
        self.sleeping[node][entry] = svc.memory_gb
        self.host_used[node] += svc.memory_gb
        return 1

    def _wake(self, node: str, entry: tuple[str, int, int]) -> None:
        gb = self.sleeping[node].pop(entry, None)
        if gb is not None:
            self.host_used[node] -= gb

    def _evict(self, node: str, entry: tuple[str, int, int]) -> None:
        service, k, start = entry
        self._extra_memo.clear()
        for g in range(start, start + k):
            fp = self.cache[node][g].pop(entry, None)
            if fp is not None:
                self.mem_used[node][g] -= fp
        self.resident.get((service, k), set()).discard((node, start))
        self.evictions += 1

    def _place(
        self, svc: Service, k: int, node: str, start: int
    ) -> tuple[float | None, list[Resident]]:
        """Make the variant resident on the chunk; return (what its restore costs, None
        when it was resident; what it evicted)."""
        entry = (svc.name, k, start)
        caches = self.cache[node]
        if self.is_resident(svc.name, k, node, start):
            for g in range(start, start + k):
                caches[g].move_to_end(entry)
            self.cache_hits += 1
            return None, []
        fp = svc.footprint(k)
        cap = self.nodes[node].memory_gb
        evicted: list[Resident] = []
        cost = self._wake_cost(svc, k, node, start)
        self._wake(node, entry)
        for g in range(start, start + k):
            while self.mem_used[node][g] + fp > cap + 1e-9 and caches[g]:
                victim = next(iter(caches[g]))
                self._evict(node, victim)
                level = self._sleep(node, victim)
                evicted.append(Resident(victim[0], victim[1], node, victim[2], level))
        for g in range(start, start + k):
            caches[g][entry] = fp
            self.mem_used[node][g] += fp
        self.resident.setdefault((svc.name, k), set()).add((node, start))
        self.restores += 1
        return cost, evicted

    # ---- a round ----------------------------------------------------------------------
    def counts(self) -> tuple[int, ...]:
        out = [0] * len(self.sizes)
        for chunks in self.free.values():
            for i, s in enumerate(self.sizes):
                out[i] += len(chunks[s])
        return tuple(out)

    def begin_round(self, now: float) -> Scratch:
        return _GpuScratch(self.counts(), self.slots, self.batching, self)

    def why(self, action: Action, amount: int, now: float) -> dict[str, Any] | None:
        if take_chunk(self.counts(), amount) is not None:
            return None
        if action.service is not None and self.slots.get((action.service, amount)):
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
        one where the service is resident, then one where it sleeps with its weights in
        host RAM (a cheaper wake), then the lowest position."""
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
                    rank = (
                        self._warmth(service, amount, node_name, sub),
                        n_i,
                        first,
                        sub,
                        node_name,
                    )
                    if best is None or rank < best:
                        best = rank
        assert best is not None
        return best[4], best[2], best[3], size

    def _warmth(self, service: str | None, k: int, node: str, start: int) -> int:
        """0: the variant is resident on the chunk; 1: it sleeps there with its weights in
        host RAM; 2: neither."""
        if service is None:
            return 2
        if self.is_resident(service, k, node, start):
            return 0
        return 1 if (service, k, start) in self.sleeping[node] else 2

    def allocate(
        self, action: Action, amount: int, part: Hashable, now: float
    ) -> Allocation | None:
        svc = self.services.get(action.service) if action.service else None
        pick = self._choose(amount, action.service)
        if svc is not None and self.slots.get((svc.name, amount)):
            warm = pick is not None and self.is_resident(svc.name, amount, pick[0], pick[2])
            if self.prefer_join(action, amount, pick is not None, warm):
                return self._join(action, svc, amount)
        if pick is None:
            return None
        node, start, sub, size = pick
        self.tick(now)
        self._take(node, start, size, sub, amount)
        restore, paid, evicted = False, 0.0, list[Resident]()
        if svc is not None:
            cost, evicted = self._place(svc, amount, node, sub)
            if cost is not None:
                restore, paid = True, cost
                self.restore_seconds_total += cost
            if self._open(svc, amount, node, sub, 0):
                self.started_with[action.id] = 1
        return Allocation(
            amount=amount,
            node=node,
            units=tuple(range(sub, sub + amount)),
            restore=restore,
            evicts=tuple(evicted),
            restore_seconds=paid,
        )

    # ---- request slots ------------------------------------------------------------------
    def _open(self, svc: Service, k: int, node: str, start: int, epoch: int) -> bool:
        """The first action on a chunk of a service that batches opens an instance."""
        if svc.max_concurrency <= 1:
            return False
        self.instances[(node, start)] = Instance(svc.name, k, 1, epoch)
        v = (svc.name, k)
        self.slots[v] = self.slots.get(v, 0) + svc.max_concurrency - 1
        return True

    def prefer_join(self, action: Action, k: int, chunk_free: bool, warm: bool) -> bool:
        """Whether ``action`` should join a running instance's free slot rather than take
        a free chunk of its own: always when no chunk is free; never when a resident,
        idle instance waits on a free chunk (no restore, no batching); otherwise when its
        batching slowdown costs less than a restore (and, without a batching curve, as
        in the live broker, always: the operator's ``max_concurrency`` says the engine
        serves that many at once)."""
        if not chunk_free:
            return True
        if warm:
            return False
        svc = self.services[action.service or ""]
        d = action.duration_at(k)
        if not svc.batching or d is None:
            return True
        n = 1 + min(
            (i.active for i in self.instances.values() if i.service == svc.name and i.k == k),
            default=0,
        )
        return svc.latency_factor(n) * d <= d + svc.restore_seconds

    def warm_free(self, v: Variant) -> int:
        """Free chunks where the variant is resident (idle instances)."""
        return sum(
            1 for node, start in self.resident.get(v, ()) if self._chunk_free(node, start, v[1])
        )

    def _join(self, action: Action, svc: Service, k: int) -> Allocation:
        """Join the running instance of the variant with the fewest actions in flight
        (the least batching slowdown), then the first node and chunk."""
        best: tuple[int, int, str, int] | None = None
        for n_i, ((node, start), inst) in enumerate(self.instances.items()):
            if inst.service == svc.name and inst.k == k and inst.active < svc.max_concurrency:
                rank = (inst.active, n_i, node, start)
                if best is None or rank < best:
                    best = rank
        assert best is not None, "free slots counted for an instance that has none"
        _, _, node, start = best
        inst = self.instances[(node, start)]
        inst.active += 1
        self.started_with[action.id] = inst.active
        self.slots[(svc.name, k)] -= 1
        self.joins += 1
        self.cache_hits += 1
        entry = (svc.name, k, start)
        for g in range(start, start + k):
            self.cache[node][g].move_to_end(entry)
        return Allocation(
            amount=k, node=node, units=tuple(range(start, start + k)), epoch=inst.epoch
        )

    def _leave(self, node: str, start: int) -> bool:
        """An action on a shared instance ended; whether the chunk is now free."""
        inst = self.instances[(node, start)]
        svc = self.services[inst.service]
        v = (inst.service, inst.k)
        inst.active -= 1
        if inst.active > 0:
            self.slots[v] += 1
            return False
        del self.instances[(node, start)]
        self.slots[v] -= svc.max_concurrency - 1
        if not self.slots[v]:
            del self.slots[v]
        return True

    def granted(self, alloc: Allocation, token: int) -> None:
        """The lease holding ``alloc`` got fencing token ``token``: an instance it opened
        takes that token as its epoch."""
        if alloc.node is None or not alloc.units:
            return
        inst = self.instances.get((alloc.node, alloc.units[0]))
        if inst is not None and not inst.epoch:
            inst.epoch = alloc.epoch or token

    def latency_factor(self, action: Action, alloc: Allocation) -> float:
        """At the actions in flight on its instance when it was granted (asked once)."""
        n = self.started_with.pop(action.id, None)
        if n is None or action.service is None:
            return 1.0
        return self.services[action.service].latency_factor(n)

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
        svc = self.services.get(action.service) if action.service else None
        inst = self.instances.get((alloc.node, sub))
        if (
            inst is not None
            and svc is not None
            and (inst.service, inst.k) == (svc.name, amount)
            and inst.active < svc.max_concurrency
        ):
            inst.active += 1
            self.slots[(svc.name, amount)] -= 1
            if alloc.epoch:
                inst.epoch = alloc.epoch
            return
        for size in self.sizes:
            start = sub - sub % size
            if size >= amount and start in self.free[alloc.node][size]:
                self.tick(now)
                self._take(alloc.node, start, size, sub, amount)
                if svc is not None:
                    if not self.is_resident(svc.name, amount, alloc.node, sub):
                        self._place(svc, amount, alloc.node, sub)
                    self._open(svc, amount, alloc.node, sub, alloc.epoch)
                return
        raise ValueError(f"GPUs {list(alloc.units)} of {alloc.node} are not free")

    def rollback(self, action: Action, alloc: Allocation, now: float) -> None:
        self.release(action, alloc, now, None)
        if alloc.epoch:  # it had joined a running instance
            self.joins -= 1
            self.cache_hits -= 1
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
        """The restore its grant pays, as estimated then (a grant recorded before
        ``Allocation.restore_seconds`` existed: the service's restore time now)."""
        if alloc.restore and action.service is not None:
            return alloc.restore_seconds or self.services[action.service].restore_seconds
        return 0.0

    def release(
        self, action: Action, alloc: Allocation, now: float, usage: dict[str, Any] | None
    ) -> None:
        assert alloc.node is not None
        node, start, size = alloc.node, alloc.units[0], alloc.amount
        if self.instances and (node, start) in self.instances:
            self.started_with.pop(action.id, None)
            if not self._leave(node, start):
                return  # others still run on the instance: its chunk stays busy
        self.tick(now)
        self._extra_memo.clear()
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
                "instances": {
                    str(start): {"service": i.service, "k": i.k, "active": i.active}
                    for (node_name, start), i in self.instances.items()
                    if node_name == n
                },
            }
            for n, node in self.nodes.items()
        }


class SlotOperator(Operator):
    """The DP operator of a variant's free request slots: each candidate takes one slot
    at the variant's chunk size, and no other amount."""

    def __init__(self, free: int, k: int) -> None:
        self.free = free
        self.k = k

    def start(self) -> int:
        return self.free

    def take(self, state: int, k: int) -> int | None:
        return state - 1 if k == self.k and state > 0 else None

    def units(self, state: int) -> int:
        return state * self.k


class _GpuScratch(Scratch):
    """Free chunk counts and free request slots for one round. Partitions: ``""`` (the
    pool's chunks) and, per variant with free slots, ``("slots", service, k)``."""

    __slots__ = (
        "_blocked",
        "batching",
        "counts",
        "joins",
        "mgr",
        "slots",
        "slots0",
        "start",
        "takes",
        "warm",
    )

    def __init__(
        self,
        counts: tuple[int, ...],
        slots: Mapping[Variant, int],
        batching: Mapping[str, int],
        mgr: GpuManager,
    ) -> None:
        self.mgr = mgr
        self.warm: dict[Variant, int] = {}  # idle resident instances left this round
        self.start = counts
        self.counts = counts
        self.takes: list[tuple[str, int]] = []
        self._blocked = False
        self.batching = batching
        # Free slots: at the round's start plus those of instances this round opens; and
        # what this round's joins left of them.
        self.slots0 = dict(slots) if slots else {}
        self.slots = dict(self.slots0)
        self.joins: list[tuple[str, Variant]] = []

    def _can_join(self, action: Action) -> bool:
        svc = action.service
        return svc is not None and any(n > 0 and v[0] == svc for v, n in self.slots.items())

    def fit(self, action: Action, amount: int) -> Hashable | None:
        nxt = take_chunk(self.counts, amount)
        if self.slots and action.service is not None:
            v = (action.service, amount)
            if self.slots.get(v, 0) > 0:
                warm = self.warm.get(v)
                if warm is None:
                    warm = self.warm[v] = self.mgr.warm_free(v)
                if self.mgr.prefer_join(action, amount, nxt is not None, warm > 0):
                    self.slots[v] -= 1
                    self.joins.append((action.id, v))
                    return ("slots", *v)
                if warm > 0:
                    self.warm[v] = warm - 1
        if nxt is None:
            return None
        self.counts = nxt
        self.takes.append((action.id, amount))
        extra = self.batching.get(action.service or "", 1) - 1
        if extra:  # it opens an instance: as allocate will, offer its slots to the next
            self._offer((action.service or "", amount), extra)
        return ""

    def _offer(self, v: Variant, n: int) -> None:
        self.slots[v] = self.slots.get(v, 0) + n
        self.slots0[v] = self.slots0.get(v, 0) + n

    def unfit(self, action: Action, amount: int, part: Hashable) -> None:
        if part != "":
            v = (action.service or "", amount)
            self.slots[v] += 1
            self.joins = [j for j in self.joins if j[0] != action.id]
            return
        extra = self.batching.get(action.service or "", 1) - 1
        if extra:
            self._offer((action.service or "", amount), -extra)
        self.takes = [t for t in self.takes if t[0] != action.id]
        counts: tuple[int, ...] | None = self.start
        for _, k in self.takes:
            assert counts is not None
            counts = take_chunk(counts, k)
        assert counts is not None
        self.counts = counts

    def blocked(self, action: Action) -> bool:
        # A waiter for GPUs does not hold back an action that joins a running instance:
        # a free slot costs no GPUs.
        return self._blocked and not (self.slots and self._can_join(action))

    def block(self, action: Action) -> None:
        self._blocked = True

    @property
    def saturated(self) -> bool:
        return self._blocked and not any(self.slots.values())

    def partition_of(self, action: Action) -> Hashable | None:
        return ""

    def operator(self, part: Hashable, group: set[str]) -> Operator:
        if part != "":
            assert isinstance(part, tuple)
            v = (part[1], part[2])
            taken = sum(1 for aid, w in self.joins if w == v and aid not in group)
            return SlotOperator(self.slots0.get(v, 0) - taken, part[2])
        counts: tuple[int, ...] | None = self.start
        for aid, k in self.takes:
            if aid not in group:
                assert counts is not None
                counts = take_chunk(counts, k)
        assert counts is not None
        return ChunkOperator(counts)
