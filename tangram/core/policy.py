"""Scheduling policies are values the core is built with, not branches inside it.

- ``tangram``: the paper's elastic scheduler (FCFS admission at minimum, then per key
  partition the DP over candidates with greedy eviction of tail candidates).
- ``min``: FCFS at minimum allocation.
- ``fixed:K``: FCFS with parallelism K on the key demand where the demand allows it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Policy:
    """``kind`` is one of tangram, min, fixed. ``k`` is the fixed parallelism;
    ``depth`` and ``lookahead`` tune the tangram estimate of the waiting queue."""

    kind: str = "tangram"
    k: int = 1
    depth: int = 2
    lookahead: int = 256

    @property
    def name(self) -> str:
        return f"fixed:{self.k}" if self.kind == "fixed" else self.kind

    @property
    def elastic(self) -> bool:
        return self.kind == "tangram"

    def key_amount(self, amounts: tuple[int, ...]) -> int:
        """The amount on the key pool that admission checks (the DP may add more later)."""
        if self.kind == "fixed":
            below = [a for a in amounts if a <= self.k]
            return below[-1] if below else amounts[0]
        return amounts[0]


def parse_policy(text: str) -> Policy:
    """Parse ``tangram``, ``tangram:depth=3``, ``min`` or ``fixed:K``."""
    name, _, arg = text.strip().partition(":")
    if name == "min" and not arg:
        return Policy("min")
    if name == "fixed":
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k <= 0:
            raise ValueError(f"policy {text!r}: write fixed:K with K a positive integer")
        return Policy("fixed", k=k)
    if name == "tangram":
        opts: dict[str, int] = {}
        for part in filter(None, arg.split(",")):
            key, _, val = part.partition("=")
            if key not in ("depth", "lookahead") or not val.isdigit() or int(val) < 1:
                raise ValueError(f"policy {text!r}: tangram takes depth=N and lookahead=N (N >= 1)")
            opts[key] = int(val)
        return Policy("tangram", **opts)
    raise ValueError(f"unknown policy {text!r}; use tangram, min or fixed:K")
