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
a service may bring its own ``to_device`` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tangram.executors.fencing import DEFAULT_SKEW, Fence, SignedGrant
from tangram.spec import Resident


class ServiceError(ValueError):
    """An unknown service or a malformed call; the message says what is registered."""


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """How to build and run one service: ``loader()`` returns the host state,
    ``run(state_on_device, payload)`` serves one call."""

    name: str
    loader: Callable[[], Any]
    run: Callable[[Any, Any], Any]
    to_device: Callable[[Any, str], Any] | None = None


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
    without one (direct trusted use only)."""

    def __init__(
        self,
        node: str = "",
        device_kind: str = "cpu",
        *,
        pool: str | None = None,
        fencing_key: bytes | None = None,
        trusted: bool = False,
        grant_skew: float = DEFAULT_SKEW,
    ) -> None:
        if device_kind not in ("cpu", "cuda"):
            raise ServiceError(f"device kind must be 'cpu' or 'cuda', got {device_kind!r}")
        self.fence = Fence(fencing_key, verify=not trusted, skew=grant_skew)
        self.node = node
        self.pool = pool
        self.device_kind = device_kind
        self.specs: dict[str, ServiceSpec] = {}
        self.host: dict[str, Any] = {}
        self.load_seconds: dict[str, float] = {}
        # (service, chunk size, first unit) -> the state on that chunk's device
        self.resident: dict[tuple[str, int, int], Any] = {}

    def register(self, spec: ServiceSpec) -> float:
        """Build the service's host copy now; return how long loading took."""
        if not spec.name:
            raise ServiceError("a service needs a name")
        t0 = time.perf_counter()
        self.host[spec.name] = spec.loader()
        took = time.perf_counter() - t0
        self.specs[spec.name] = spec
        self.load_seconds[spec.name] = took
        return took

    def device(self, units: Sequence[int]) -> str:
        # A chunk's state lives on its first GPU; a tensor-parallel service splits it
        # further itself (its own ``to_device``).
        return "cpu" if self.device_kind == "cpu" else f"cuda:{units[0]}"

    def evict(self, victims: Sequence[Resident]) -> list[Resident]:
        """Drop the broker's evictions (``Allocation.evicts``); return those dropped."""
        for victim in victims:  # a caller's bug, refused before anything is dropped
            if not isinstance(victim, Resident):
                raise ServiceError(f"cannot read eviction {victim!r}: expected a Resident")
        out = []
        for victim in victims:
            if self.resident.pop((victim.service, victim.k, victim.start), None) is not None:
                out.append(victim)
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
        evicted = self.evict(evicts)
        key = (service, len(units), units[0])
        # Restore whenever the state is not here, whatever the broker believed: after an
        # executor restart its cache is empty even where the broker's is not.
        restored = key not in self.resident
        seconds = await asyncio.to_thread(self.restore, service, units) if restored else 0.0
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

    def residents(self) -> list[Resident]:
        """What is resident on this node's devices, sorted."""
        return sorted(Resident(s, k, self.node, u) for s, k, u in self.resident)

    def _spec(self, service: str) -> ServiceSpec:
        spec = self.specs.get(service)
        if spec is None:
            known = ", ".join(sorted(self.specs)) or "none"
            raise ServiceError(f"service {service!r} is not registered here; registered: {known}")
        return spec
