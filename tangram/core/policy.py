"""Scheduling policies by name: ``tangram`` (load-priced elastic parallelism, the
default), ``paper`` (the paper's elastic scheduler, Algorithm 1, kept for comparison),
``min`` (FCFS at the minimum) and ``fixed:K`` (a fixed degree of parallelism K). A
policy is an object the core is built with (tangram.core.policies.base says what it
decides); a new one is one file under tangram/core/policies/ and one line in
``POLICIES``.
"""

from __future__ import annotations

from collections.abc import Callable

from tangram.core.policies.base import Policy
from tangram.core.policies.fixed import Fixed
from tangram.core.policies.paper import Paper
from tangram.core.policies.tangram import Tangram

__all__ = ["POLICIES", "Fixed", "Paper", "Policy", "Tangram", "parse_policy"]


def _options(arg: str, types: dict[str, type], usage: str) -> dict[str, float | int]:
    """``key=value,key=value`` with each key in ``types`` and its value of that type."""
    opts: dict[str, float | int] = {}
    for part in filter(None, arg.split(",")):
        key, _, val = part.partition("=")
        kind = types.get(key)
        try:
            if kind is None:
                raise ValueError
            opts[key] = kind(val)
        except ValueError:
            raise ValueError(usage) from None
    return opts


def _min(arg: str) -> Policy:
    if arg:
        raise ValueError("min takes no options")
    return Policy()


def _fixed(arg: str) -> Policy:
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError("write fixed:K with K a positive integer")
    return Fixed(int(arg))


def _paper(arg: str) -> Policy:
    usage = "paper takes depth=N and lookahead=N (N >= 1)"
    opts = _options(arg, {"depth": int, "lookahead": int}, usage)
    if any(v < 1 for v in opts.values()):
        raise ValueError(usage)
    return Paper(**opts)  # type: ignore[arg-type]


def _tangram(arg: str) -> Policy:
    usage = (
        "tangram takes share=F (0 < F <= 1), price=F, boost=F, wait=F (each >= 0), long=F"
        " (>= 1), overdue=F (seconds, finite, >= 0; 0: FCFS), grain=F (finite, >= 1) and"
        " saturation=F (0 < F < 1)"
    )
    keys = ("share", "price", "boost", "long", "wait", "overdue", "grain", "saturation")
    opts = _options(arg, dict.fromkeys(keys, float), usage)
    try:
        return Tangram(**opts)
    except ValueError:
        raise ValueError(usage) from None


# name -> factory taking what follows "name:" in the policy string
POLICIES: dict[str, Callable[[str], Policy]] = {
    "tangram": _tangram,
    "paper": _paper,
    "min": _min,
    "fixed": _fixed,
}


def parse_policy(text: str) -> Policy:
    """Parse ``tangram[:share=F,price=F,boost=F,long=F,wait=F,overdue=F,grain=F,saturation=F]``,
    ``paper[:depth=N,lookahead=N]``, ``min`` or ``fixed:K``."""
    name, _, arg = text.strip().partition(":")
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {text!r}; use tangram, paper, min or fixed:K")
    try:
        return factory(arg)
    except ValueError as exc:
        raise ValueError(f"policy {text!r}: {exc}") from None
