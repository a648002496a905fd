"""Tangram: an action-level resource broker for agentic reinforcement learning."""

from tangram.spec import (
    Action,
    ActionCancelled,
    Allocation,
    Amdahl,
    Demand,
    EfficiencyTable,
    InvalidAction,
    Lease,
    LeaseExpired,
    LeaseReleased,
    TangramError,
    UnknownLease,
)

__all__ = [
    "Action",
    "ActionCancelled",
    "Allocation",
    "Amdahl",
    "Demand",
    "EfficiencyTable",
    "InvalidAction",
    "Lease",
    "LeaseExpired",
    "LeaseReleased",
    "TangramError",
    "UnknownLease",
]
__version__ = "0.1.0"
