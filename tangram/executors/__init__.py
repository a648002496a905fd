"""Executors: the code that really runs an action on the units its lease granted.

Plain classes, free of Ray, so they can be tested (and used) on their own; ``tangram.ray``
wraps them in actors placed on the right nodes.

- ``SandboxRunner``: commands in a trajectory's persistent working directory, as a child
  process pinned to exactly the granted cores.
- ``ServiceHost``: GPU services (models) kept in host memory, restored onto the granted
  devices, evicted when the broker says so; or served by engines (``VllmEngine``,
  ``SglangEngine``, ``InProcessEngine``) whose instances sleep on eviction and wake on
  restore (docs/gpu-services.md).
- ``Fence``, ``GrantSigner``, ``SignedGrant``: executors run work only under a grant the
  broker signed for exactly its units, unexpired and not older than the newest fencing
  token seen for them; refusals are ``StaleLease``, ``ForgedGrant`` and
  ``GrantMismatch`` (all ``FencingError``).
- ``HttpCaller``: quota-governed HTTP calls with their token usage read back.
"""

from tangram.executors.api import HttpCall, HttpCaller, HttpResult
from tangram.executors.engines import (
    Engine,
    EngineError,
    HttpEngine,
    InProcessEngine,
    Instance,
    SglangEngine,
    VllmEngine,
)
from tangram.executors.fencing import (
    Fence,
    FencingError,
    ForgedGrant,
    GrantMismatch,
    GrantSigner,
    SignedGrant,
    StaleLease,
)
from tangram.executors.sandbox import Command, CommandResult, Limits, SandboxRunner
from tangram.executors.service import ServiceCall, ServiceHost, ServiceResult, ServiceSpec

__all__ = [
    "Command",
    "CommandResult",
    "Engine",
    "EngineError",
    "Fence",
    "FencingError",
    "ForgedGrant",
    "GrantMismatch",
    "GrantSigner",
    "HttpCall",
    "HttpCaller",
    "HttpEngine",
    "HttpResult",
    "InProcessEngine",
    "Instance",
    "Limits",
    "SandboxRunner",
    "ServiceCall",
    "ServiceHost",
    "ServiceResult",
    "ServiceSpec",
    "SglangEngine",
    "SignedGrant",
    "StaleLease",
    "VllmEngine",
]
