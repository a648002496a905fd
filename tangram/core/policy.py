"""Scheduling policies by name: ``tangram`` (the paper's elastic scheduler, the
default), ``min`` (FCFS at the minimum) and ``fixed:K`` (a fixed degree of parallelism
K). A policy is an object the core is built with (tangram.core.policies.base says what
it decides); a new one is one file under tangram/core/policies/ and one line in
``POLICIES``.
"""

from __future__ import annotations

from collections.abc import Callable

from tangram.core.policies.base import Policy
from tangram.core.policies.elastic import Elastic
from tangram.core.policies.fixed import Fixed

__all__ = ["POLICIES", "Elastic", "Fixed", "Policy", "parse_policy"]


def _min(arg: str) -> Policy:
    if arg:
        raise ValueError("min takes no options")
    return Policy()


def _fixed(arg: str) -> Policy:
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError("write fixed:K with K a positive integer")
    return Fixed(int(arg))


def _tangram(arg: str) -> Policy:
    opts: dict[str, int] = {}
    for part in filter(None, arg.split(",")):
        key, _, val = part.partition("=")
        if key not in ("depth", "lookahead") or not val.isdigit() or int(val) < 1:
            raise ValueError("tangram takes depth=N and lookahead=N (N >= 1)")
        opts[key] = int(val)
    return Elastic(**opts)


# name -> factory taking what follows "name:" in the policy string
POLICIES: dict[str, Callable[[str], Policy]] = {
    "tangram": _tangram,
    "min": _min,
    "fixed": _fixed,
}


def parse_policy(text: str) -> Policy:
    """Parse ``tangram``, ``tangram:depth=3,lookahead=16``, ``min`` or ``fixed:K``."""
    name, _, arg = text.strip().partition(":")
    factory = POLICIES.get(name)
    if factory is None:
        raise ValueError(f"unknown policy {text!r}; use tangram, min or fixed:K")
    try:
        return factory(arg)
    except ValueError as exc:
        raise ValueError(f"policy {text!r}: {exc}") from None


