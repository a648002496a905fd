"""Tangram: an action-level resource broker for agentic reinforcement learning."""

from typing import TYPE_CHECKING

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
    UnknownAction,
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
    "UnknownAction",
    "UnknownLease",
]
__version__ = "0.1.0"

if TYPE_CHECKING:  # type checkers see the decorator; at run time it loads on first use
    from tangram.actions import action as action


def __getattr__(name: str) -> object:
    # ``tangram.action`` (the decorator) is imported on first use, so ``import tangram``
    # stays cheap; the Ray integration lives in ``tangram.ray`` and is never imported here.
    if name == "action":
        from tangram.actions import action as action

        return action
    raise AttributeError(f"module 'tangram' has no attribute {name!r}")
