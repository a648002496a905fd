"""The wire format: request bodies (validated by FastAPI) and the response shapes the
OpenAPI schema documents. Responses are built by ``wire.py`` as plain dicts (cheaper than
validating models on the hot path); tests check that the two agree."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

# Bounds that keep one request's work small: amounts past these never fit a real pool,
# and ranges are expanded amount by amount when the pools narrow them.
MAX_UNITS = 1024
MAX_CHOICES = 256
MAX_POOLS = 64
MAX_NAME = 256


def _whole(v: Any) -> Any:
    """JSON integers only: no booleans or strings (pydantic's lax mode takes both), but
    4.0 is 4 as JSON Schema says."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a whole number")
    return v


# Constraints before the validator, or the schema shows pydantic's "ge" for "minimum".
Units = Annotated[int, Ge(1), Le(MAX_UNITS), BeforeValidator(_whole)]
Tokens = Annotated[int, Ge(0), Le(10**12), BeforeValidator(_whole)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Seconds = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RangeIn(_In):
    """Any whole amount from ``min`` to ``max`` (elastic)."""

    min: Units
    max: Units


class ChoicesIn(_In):
    """One of these amounts (elastic when there are several)."""

    choices: list[Units] = Field(..., min_length=1, max_length=MAX_CHOICES)


def _shape(v: Any) -> str | None:
    """Which of the three shapes a demand is written in, so errors name that shape."""
    if isinstance(v, dict):
        return "choices" if "choices" in v else "range"
    if isinstance(v, BaseModel):
        return "choices" if isinstance(v, ChoicesIn) else "range"
    return "amount"


DemandIn = Annotated[
    Annotated[Units, Tag("amount")]
    | Annotated[RangeIn, Tag("range")]
    | Annotated[ChoicesIn, Tag("choices")],
    Discriminator(_shape),
]


class AmdahlIn(_In):
    amdahl: float = Field(..., ge=0, le=1, description="the parallel fraction p")


class TableIn(_In):
    table: dict[str, Annotated[float, Field(gt=0, le=1)]] = Field(
        ...,
        min_length=1,
        max_length=MAX_CHOICES,
        description='measured parallel efficiency E(m) per unit count: {"1": 1.0, "4": 0.9}',
    )


class ActionIn(_In):
    """An action: one external call of a trajectory, and the units it needs."""

    trajectory: Name
    demands: dict[Name, DemandIn] = Field(
        ...,
        min_length=1,
        max_length=MAX_POOLS,
        description="pool name -> amount: 4, {min, max} or {choices}",
    )
    task: Name = "default"
    key: Name | None = Field(None, description="the demand whose amount sets the duration")
    duration: Seconds | None = Field(None, description="seconds at the key demand's minimum")
    efficiency: AmdahlIn | TableIn | None = None
    service: Name | None = Field(None, description="the GPU service (model) to run")
    tokens: Tokens | None = Field(None, description="expected API tokens")
    memory_gb: float = Field(0.0, ge=0, le=1e9, allow_inf_nan=False)
    ttl: float | None = Field(
        None, gt=0, le=86400, allow_inf_nan=False, description="lease TTL in seconds"
    )


class UsageIn(BaseModel):
    """What the call used; ``tokens`` corrects tokens-per-minute pools. Other numbers are
    accepted and ignored, so clients may report more without breaking."""

    model_config = ConfigDict(extra="allow")
    tokens: Tokens | None = None


HOLDER = (
    "the lease's fencing token, as granted: when given, a call from a caller that does "
    "not hold the lease (another token) answers 409 and changes nothing"
)


class ReleaseIn(_In):
    outcome: Literal["ok", "error"] = "ok"
    usage: UsageIn | None = None
    fencing_token: int | None = Field(None, ge=0, description=HOLDER)


class HeartbeatIn(_In):
    ttl: float | None = Field(
        None, gt=0, le=86400, allow_inf_nan=False, description="new TTL in seconds"
    )
    fencing_token: int | None = Field(None, ge=0, description=HOLDER)


# --------------------------------------------------------------------------- responses


class AllocationOut(BaseModel):
    amount: int
    node: str | None
    units: list[int | str]


class LeaseOut(BaseModel):
    id: str
    fencing_token: int = Field(..., description="grows with every grant; fence stale holders")
    allocation: dict[str, AllocationOut]
    dop: int = Field(..., description="units granted on the key pool (1 without a key)")
    restore: bool = Field(..., description="a GPU service had to be restored for this grant")
    expires_at: float = Field(..., description="Unix time (seconds) at which the lease lapses")
    ttl: float = Field(..., description="seconds a heartbeat extends the lease by")


State = Literal["queued", "granted", "released", "expired", "cancelled"]


class WaitingOut(BaseModel):
    """Why a queued action is not granted yet, from the broker's state at the answer."""

    model_config = ConfigDict(extra="allow")
    reason: str = Field(
        ...,
        description="insufficient_units, rate_limited, memory, behind_earlier_action, "
        "held_after_restart or next_round",
    )
    message: str = Field(..., description="the same in words")
    pool: str | None = Field(None, description="the pool that holds it")
    node: str | None = Field(None, description="the node (CPU) that holds it")
    limit: str | None = Field(
        None, description="the quota limit: concurrency, window, rate or tokens"
    )
    needs: float | None = Field(None, description="units (or tokens) it needs there")
    free: float | None = Field(None, description="units (or tokens) free there now")
    ahead: int | None = Field(None, description="earlier queued actions competing for them")
    ready_at: float | None = Field(
        None, description="Unix time at which time alone lets it be admitted (a quota refill)"
    )


class ActionOut(BaseModel):
    id: str
    state: State
    trajectory: str
    lease: LeaseOut | None = Field(None, description="present once granted")
    waiting: WaitingOut | None = Field(None, description="present while queued: why it waits")


class LeaseStateOut(BaseModel):
    id: str
    action: str
    state: Literal["granted", "released", "expired"]
    expires_at: float
    ttl: float


class CloseOut(BaseModel):
    trajectory: str
    cancelled: int = Field(..., description="queued actions of the trajectory cancelled")


class PoolOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    kind: str
    capacity: int
    in_use: int
    queued: int
    nodes: dict[str, dict[str, Any]]
    topology: dict[str, Any]


class PoolsOut(BaseModel):
    policy: str
    queued: int
    leases: int
    pools: dict[str, PoolOut]


class WaiterOut(BaseModel):
    action: str
    trajectory: str
    tenant: str | None = None
    pools: list[str]
    waited_seconds: float
    reason: str | None = None
    message: str | None = None


class HeldOut(BaseModel):
    action: str
    trajectory: str
    tenant: str | None = None
    pools: dict[str, int]
    age_seconds: float


class StatusOut(PoolsOut):
    """``GET /v1/pools`` and what an operator asks next: who queues where, who waits
    longest and why, how old the leases are."""

    queued_by_tenant: dict[str, dict[str, int]] = Field(
        description='pool -> tenant ("" without tenants) -> queued actions'
    )
    oldest_waiting: list[WaiterOut]
    leases_by_age: dict[str, int] = Field(description="<10s, 10s-1m, 1m-10m, >=10m")
    oldest_leases: list[HeldOut]


class HealthOut(BaseModel):
    status: str


class ProblemOut(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
