"""``fixed:K``: FCFS with a fixed degree of parallelism K on the key demand, where the
demand allows it (the largest feasible amount at most K; the smallest one above K when
none is below)."""

from __future__ import annotations

from tangram.core.entries import Entry
from tangram.core.policies.base import Policy


class Fixed(Policy):
    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"fixed:K needs K >= 1, got {k}")
        self.k = k
        self.name = f"fixed:{k}"

    def key_amount(self, entry: Entry) -> int:
        amounts = entry.feasible[entry.action.key]  # type: ignore[index]
        below = [a for a in amounts if a <= self.k]
        return below[-1] if below else amounts[0]
