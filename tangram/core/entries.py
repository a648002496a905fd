"""What a scheduling round works on: queued actions (with the amounts each pool could
ever grant them) and the actions a round admitted. Shared by the round in state.py and
the policies, which read and annotate them; nothing here decides anything."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from tangram.core.arrange import Waiting
from tangram.spec import Action


@dataclass(slots=True)
class Entry:
    """A queued action with the amounts each of its pools could ever grant."""

    action: Action
    feasible: dict[str, tuple[int, ...]]
    # Set by a policy when the action is queued (``Policy.prepare``), for its rounds:
    durations: Any = None  # the key pool's duration per feasible amount
    wait: Waiting | None = None  # how the estimate sees it while it waits
    weight: float = 1.0  # how much its time counts against others' (``tangram``)
    throttled_on: tuple[str, ...] = ()  # pools whose time-based limit held it back
    # Its place among the queued actions that are not overdue, when the policy orders
    # them shortest first (``Policy.overdue`` > 0): (expected duration, seq, id).
    order: tuple[float, int, str] | None = None


@dataclass(slots=True)
class Admitted:
    """An action the round admitted: its amount and partition per pool (a policy may
    change the amounts, or defer it)."""

    entry: Entry
    amounts: dict[str, int]
    parts: dict[str, Hashable] = field(default_factory=dict)


def by_partition(admitted: list[Admitted]) -> dict[tuple[str, Hashable], list[Admitted]]:
    """The admitted actions using each (pool, partition), in FCFS order: the groups the
    elastic policies arrange."""
    groups: dict[tuple[str, Hashable], list[Admitted]] = {}
    for adm in admitted:
        for p, part in adm.parts.items():
            groups.setdefault((p, part), []).append(adm)
    return groups
