"""The interface every scheduling policy implements, and the simplest policy: FCFS at
the minimum amount (``min``).

The core runs one round per call of ``Core.schedule``: it walks the queue and admits
every action whose amounts fit, unless a waiter met earlier in the walk competes for the
same units. The walk is FCFS, unless the policy orders the queue (``overdue`` > 0): then
the actions queued ``overdue`` seconds or longer come first, in FCFS order, and the rest
by their expected duration, shortest first (``Policy.expected``). A policy decides, at
fixed points of that round (as plugins do at the extension points of the Kubernetes
scheduler framework):

| hook | when | what the policy decides |
|---|---|---|
| ``bind(pools, queued)`` | the core is built | a policy of its own for this core (state, if any) |
| ``prepare(entry)`` | an action is queued | what it wants cached for its rounds |
| ``overdue``, ``expected(entry)`` | an action is queued | its place in the walk (FCFS by default) |
| ``key_amount(entry)`` | admission | the amount on the key pool an action is admitted at |
| ``lookahead`` | admission | how many waiters past saturation ``arrange`` wants to see |
| ``arrange(...)`` | after admission | final amounts of admitted actions; which to defer |
| ``on_grant(lease)``, ``on_end(lease)`` | a lease begins, ends | its own index of running leases |

A policy never allocates units and never reads a clock: the core passes ``now``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from tangram.core.entries import Admitted, Entry

if TYPE_CHECKING:
    from tangram.core.managers.base import Manager, Scratch
    from tangram.spec import Lease


class Policy:
    """FCFS at the minimum amount: every hook does nothing beyond admission."""

    name = "min"
    # Waiters past saturation the round collects for ``arrange`` (0: it needs none).
    lookahead = 0
    # Seconds after which a queued action is overdue. Overdue actions are walked first,
    # in FCFS order, then the others by ``expected``, shortest first. 0: every action is
    # overdue at once, the walk is FCFS (and the core keeps no sorted index).
    overdue = 0.0

    def bind(self, pools: Mapping[str, Manager], queued: Mapping[str, int]) -> Policy:
        """This policy for one core over ``pools``; a stateless policy is its own.
        ``queued`` is the core's live count of queued actions per pool (read only)."""
        return self

    def prepare(self, entry: Entry) -> None:
        """An action was queued."""

    def expected(self, entry: Entry) -> float:
        """The action's expected duration, its place in the walk until it is overdue
        (read once, after ``prepare``, only when ``overdue`` > 0)."""
        return 0.0

    def key_amount(self, entry: Entry) -> int:
        """The amount on the key pool that admission checks (``arrange`` may change it)."""
        return entry.feasible[entry.action.key][0]  # type: ignore[index]

    def arrange(
        self,
        admitted: list[Admitted],
        waiting: list[Entry],
        scratches: Mapping[str, Scratch],
        now: float,
        deferred: set[str],
    ) -> None:
        """Set the final amounts of the admitted actions (in ``Admitted.amounts``) and add
        the ids of those to defer to ``deferred``. ``admitted`` and ``waiting`` (the
        actions that wait) are in the order of the round's walk (FCFS unless ``overdue``
        > 0); ``scratches`` the round's tentative state per pool."""

    def on_grant(self, lease: Lease) -> None:
        """A lease began (granted, or restored after a restart)."""

    def on_end(self, lease: Lease) -> None:
        """A lease ended (released or expired)."""

    def __repr__(self) -> str:
        return f"<policy {self.name}>"
