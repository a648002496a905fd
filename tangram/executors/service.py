"""The GPU service executor: evict-on-execution, made real.

A registered service has a loader that builds its state (the model's weights) once; the
host keeps that copy in host memory. When the broker grants a chunk of GPUs that does
not hold the service, the state is copied onto the granted device (a restore, timed);
services the broker chose to evict are dropped from their devices; nothing is written
back because weights do not change. The measured restore time goes back to the GPU
pool's cost model (``GpuManager.observe_restore``) through the caller.

Devices are named like torch's: ``cpu`` or ``cuda:N``. With no GPU (CI) the device is
the CPU, and a restore is a real copy of the host arrays into fresh memory, so load,
restore, evict and run are exercised for real. States are numpy arrays, objects with a
``.to(device)`` method (torch tensors and modules), or dicts, lists and tuples of them;
a service may bring its own ``to_device`` instead, and an ``evict`` hook that releases
device memory when its copy is dropped (``torch.cuda.empty_cache()``, say).

A service with an ``engine`` (tangram/executors/engines.py: vLLM, SGLang, in process) is
served by engine instances instead, one per chunk: evictions put instances to sleep,
all of them before the granted instance is woken (or launched), so two engines never
hold the same GPUs' memory at once; the call is an HTTP request to the instance, and
the measured wake time is the restore time. See docs/gpu-services.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tangram.executors.engines import Engine, EngineError, Instance
from tangram.executors.fencing import DEFAULT_SKEW, Fence, SignedGrant
from tangram.spec import Resident

LAUNCH_POLICIES = ("on-demand", "pre-launched")
Key = tuple[str, int, int]  # (service, chunk size, first GPU): one variant on one chunk


class ServiceError(ValueError):
    """An unknown service or a malformed call; the message says what is registered."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """How to build and run one service: ``loader()`` returns the host state,
    ``run(state_on_device, payload)`` serves one call; ``evict(state_on_device)``, if
    given, runs when the broker evicts that copy (to release device memory).

    Or an ``engine`` serves it (``loader`` and ``run`` are then not used): ``launch`` is
    ``"on-demand"`` (an instance is launched at the first call on a chunk and kept,
    asleep, after evictions) or ``"pre-launched"`` (at registration, an instance on
    every chunk of a size in ``parallelism``, each put to sleep until needed);
    ``sleep_level`` is what evictions pass to ``Instance.sleep``."""

    name: str
    loader: Callable[[], Any] | None = None
    run: Callable[[Any, Any], Any] | None = None
    to_device: Callable[[Any, str], Any] | None = None
    evict: Callable[[Any], Any] | None = None
    engine: Engine | None = None
    launch: str = "on-demand"
    parallelism: tuple[int, ...] = (1,)
    sleep_level: int = 1

    def __post_init__(self) -> None:
        if self.launch not in LAUNCH_POLICIES:
            raise ServiceError(f"launch must be one of {LAUNCH_POLICIES}, got {self.launch!r}")
        if self.engine is None and (self.loader is None or self.run is None):
            raise ServiceError(f"service {self.name!r} needs a loader and a run, or an engine")
        if not self.parallelism or any(k < 1 for k in self.parallelism):
            raise ServiceError(f"parallelism must be GPU counts >= 1, got {self.parallelism}")


@dataclass(frozen=True, slots=True)
class ServiceCall:
    """One call of the action's service (``Action.service``) with ``payload``."""

    payload: Any = None


@dataclass(slots=True)
class ServiceResult:
    output: Any
    restored: bool
    restore_seconds: float
    evicted: list[Resident]
    device: str
    node: str = ""
    resident: list[Resident] = field(default_factory=list)
    # Engine services: a cold start is not a restore (the cost model learns wake times),
    # so it is reported apart; ``url`` is the instance that served the call.
    launched: bool = False
    launch_seconds: float = 0.0
    url: str = ""
    # The sleep level the restore woke the instance from (2: its weights were reloaded,
    # which the cost model learns apart from wakes from host RAM; 0: not an engine).
    woke_from: int = 0


def to_device(state: Any, device: str) -> Any:
    """Copy ``state`` onto ``device``: numpy arrays into fresh memory (the CPU device),
    anything with ``.to`` through it, containers element by element."""
    if isinstance(state, np.ndarray):
        if device != "cpu":
            raise ServiceError(f"numpy state cannot live on {device!r}; use torch tensors")
        return np.array(state, copy=True)
    if isinstance(state, dict):
        return {k: to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_device(v, device) for v in state)
    move = getattr(state, "to", None)
    if callable(move):
        return move(device)
    return state  # plain Python values (config, vocabularies) are shared as they are


class ServiceHost:
    """The services of one GPU node: host copies, and what is resident on which chunk.

    Calls are fenced like ``SandboxRunner``'s: the lease's signed grant, checked with
    ``fencing_key`` against ``node`` and ``pool``; ``trusted=True`` also serves calls
    without one (direct trusted use only). ``gpus`` (the node's GPU count) is needed
    only by pre-launched engine services, to know every chunk they could be granted."""

    def __init__(
        self,
        node: str = "",
        device_kind: str = "cpu",
        *,
        pool: str | None = None,
        fencing_key: bytes | None = None,
        trusted: bool = False,
        grant_skew: float = DEFAULT_SKEW,
        gpus: int = 0,
    ) -> None:
        if device_kind not in ("cpu", "cuda"):
            raise ServiceError(f"device kind must be 'cpu' or 'cuda', got {device_kind!r}")
        self.fence = Fence(fencing_key, verify=not trusted, skew=grant_skew)
        self.node = node
        self.pool = pool
        self.device_kind = device_kind
        self.gpus = gpus
        self.specs: dict[str, ServiceSpec] = {}
        self.host: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}
        # (service, chunk size, first unit) -> the state on that chunk's device
        self.resident: dict[Key, Any] = {}
        # Engine services: every instance launched, and those awake (holding GPU memory).
        self.instances: dict[Key, Instance] = {}
        self.awake: set[Key] = set()
        self.slept_at: dict[Key, int] = {}  # the level each sleeping instance sleeps at
        # One restore, launch or wake per chunk at a time: the actions sharing an
        # instance's request slots may arrive together, and only the first pays it.
        self._starting: dict[Key, asyncio.Lock] = {}

    def register(self, spec: ServiceSpec) -> float:
        """Build the service's host copy now (or, pre-launched, start its sleeping
        instances); return how long that took."""
        if not spec.name:
            raise ServiceError("a service needs a name")
        t0 = time.perf_counter()
        if spec.engine is not None:
            if spec.launch == "pre-launched":
                _blocking(self._prelaunch(spec))
        else:
            assert spec.loader is not None  # ServiceSpec checked it
            self.host[spec.name] = spec.loader()
        took = time.perf_counter() - t0
        self.specs[spec.name] = spec
        self.load_seconds[spec.name] = took
        return took

    def chunks(self, spec: ServiceSpec) -> list[tuple[int, ...]]:
        """Every chunk the GPU pool could grant ``spec``: aligned runs of k GPUs, for
        each k in its parallelism, as the GPU manager cuts them."""
        return [
            tuple(range(start, start + k))
            for k in sorted(set(spec.parallelism))
            for start in range(0, self.gpus - k + 1, k)
        ]

    async def _prelaunch(self, spec: ServiceSpec) -> None:
        engine = spec.engine
        assert engine is not None
        chunks = self.chunks(spec)
        if not chunks:
            raise ServiceError(
                f"service {spec.name!r} is pre-launched but no chunk of {spec.parallelism} "
                f"GPUs fits this host's {self.gpus}; pass ServiceHost(gpus=...)"
            )
        # One at a time, each asleep before the next starts: an engine starts awake,
        # holding its GPUs' memory, and the next one on those GPUs needs it.
        started: list[Instance] = []
        try:
            for chunk in chunks:
                inst = await asyncio.to_thread(engine.launch, chunk)
                started.append(inst)
                await inst.sleep(spec.sleep_level)
                key = (spec.name, len(chunk), chunk[0])
                self.instances[key] = inst
                self.slept_at[key] = spec.sleep_level
        except BaseException:
            for inst in started:
                inst.stop()
            for chunk in chunks:
                self.instances.pop((spec.name, len(chunk), chunk[0]), None)
            raise

    def device(self, units: Sequence[int]) -> str:
        # A chunk's state lives on its first GPU; a tensor-parallel service splits it
        # further itself (its own ``to_device``).
        return "cpu" if self.device_kind == "cpu" else f"cuda:{units[0]}"

    def evict(self, victims: Sequence[Resident]) -> list[Resident]:
        """Drop the broker's evictions (``Allocation.evicts``) held in this process;
        return those dropped. (Engine instances sleep in ``release``.)"""
        for victim in victims:  # a caller's bug, refused before anything is dropped
            if not isinstance(victim, Resident):
                raise ServiceError(f"cannot read eviction {victim!r}: expected a Resident")
        out = []
        for victim in victims:
            state = self.resident.pop((victim.service, victim.k, victim.start), None)
            if state is not None:
                spec = self.specs.get(victim.service)
                if spec is not None and spec.evict is not None:
                    spec.evict(state)
                out.append(victim)
        return out

    async def release(self, victims: Sequence[Resident]) -> list[Resident]:
        """Carry out the broker's evictions: drop in-process copies and put engine
        instances to sleep; returns once every one is done (or raises)."""
        out = self.evict(victims)
        # The broker says how deep each sleeps when it accounts host RAM (level 2 when
        # the weights have no room there); otherwise the service's own level.
        levels = {
            (v.service, v.k, v.start): v.level or self._spec(v.service).sleep_level
            for v in victims
            if v.service in self.specs
        }
        asleep = [key for key in levels if key in self.awake and key in self.instances]
        await asyncio.gather(*(self.instances[k].sleep(levels[k]) for k in asleep))
        for key in asleep:
            self.awake.discard(key)
            self.slept_at[key] = levels[key]
        out += [Resident(s, k, self.node, u) for s, k, u in asleep]
        return out

    def restore(self, service: str, units: Sequence[int]) -> float:
        """Copy the host state onto the chunk; return the measured seconds."""
        spec = self._spec(service)
        dev = self.device(units)
        t0 = time.perf_counter()
        move = spec.to_device or to_device
        self.resident[(service, len(units), units[0])] = move(self.host[service], dev)
        return time.perf_counter() - t0

    async def run(
        self,
        service: str,
        units: Sequence[int],
        evicts: Sequence[Resident],
        payload: Any,
        grant: SignedGrant | None = None,
    ) -> ServiceResult:
        """Serve one call on the granted GPUs under ``grant``, the lease's signed grant
        (``lease.grant``), checked before anything is evicted or restored: it must
        verify, name exactly these GPUs on this node, be unexpired and not older than any
        fencing token seen for them (``ForgedGrant``, ``GrantMismatch``, ``StaleLease``)."""
        spec = self._spec(service)
        if not units:
            raise ServiceError("no GPUs granted: a service call needs at least one unit")
        self.fence.admit(
            units, grant, f"GPU node {self.node or 'here'}", node=self.node, pool=self.pool
        )
        # Evictions first, all of them, whatever the service: only then is the granted
        # service restored, so the evicted and the granted never hold the memory at once.
        evicted = await self.release(evicts)
        if spec.engine is not None:
            return await self._run_engine(spec, units, evicted, payload)
        assert spec.run is not None
        key = (service, len(units), units[0])
        # Restore whenever the state is not here, whatever the broker believed: after an
        # executor restart its cache is empty even where the broker's is not.
        restored, seconds = False, 0.0
        async with self._starting.setdefault(key, asyncio.Lock()):
            if key not in self.resident:
                seconds = await asyncio.to_thread(self.restore, service, units)
                restored = True
        state = self.resident[key]
        output = await asyncio.to_thread(spec.run, state, payload)
        return ServiceResult(
            output=output,
            restored=restored,
            restore_seconds=seconds,
            evicted=evicted,
            device=self.device(units),
            node=self.node,
            resident=self.residents(),
        )

    async def _run_engine(
        self, spec: ServiceSpec, units: Sequence[int], evicted: list[Resident], payload: Any
    ) -> ServiceResult:
        assert spec.engine is not None
        key = (spec.name, len(units), units[0])
        launched = restored = False
        seconds = launch_seconds = 0.0
        woke_from = 0
        async with self._starting.setdefault(key, asyncio.Lock()):
            inst = self.instances.get(key)
            if inst is not None and tuple(inst.gpus) != tuple(units):
                raise ServiceError(
                    f"instance {inst.url} runs on GPUs {inst.gpus}, not {list(units)}"
                )
            if inst is None:  # on demand, or a pre-launched instance that was stopped
                t0 = time.perf_counter()
                inst = await asyncio.to_thread(spec.engine.launch, units)
                launch_seconds = time.perf_counter() - t0
                self.instances[key] = inst
                launched = True
            elif key not in self.awake:
                t0 = time.perf_counter()
                await self._or_forget(key, inst.wake())
                seconds = time.perf_counter() - t0
                restored = True
                woke_from = self.slept_at.pop(key, spec.sleep_level)
            self.awake.add(key)
        output = await self._or_forget(key, inst.call(payload))
        return ServiceResult(
            output=output,
            restored=restored,
            restore_seconds=seconds,
            evicted=evicted,
            device=self.device(units),
            node=self.node,
            resident=self.residents(),
            launched=launched,
            launch_seconds=launch_seconds,
            url=inst.url,
            woke_from=woke_from,
        )

    async def _or_forget(self, key: Key, step: Coroutine[Any, Any, Any]) -> Any:
        """``step``; if it fails and the instance is dead, forget the instance (its
        error says why, with its stderr) so that the next call launches a new one."""
        try:
            return await step
        except EngineError:
            inst = self.instances[key]
            if not await inst.health():
                inst.stop()
                del self.instances[key]
                self.awake.discard(key)
            raise

    def residents(self) -> list[Resident]:
        """What is resident on this node's devices (engine instances: awake), sorted."""
        keys = {*self.resident, *self.awake}
        return sorted(Resident(s, k, self.node, u) for s, k, u in keys)

    def close(self) -> None:
        """Stop every engine instance (their processes end)."""
        for inst in self.instances.values():
            inst.stop()
        self.instances.clear()
        self.awake.clear()

    def _spec(self, service: str) -> ServiceSpec:
        spec = self.specs.get(service)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise ServiceError(f"service {service!r} is not registered here; registered: {known}")
        return spec


def _blocking(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to the end from synchronous code, inside an event loop or not.

    Registration is synchronous (the Ray actor registers in its constructor) while
    instances sleep and wake asynchronously; inside a running loop the coroutine gets
    a loop of its own in a worker thread, and the caller waits as it does for a loader."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()
