"""Executor fencing: work carrying an older fencing token than the units have seen is
refused.

The broker gives every lease a fencing token from one counter that only grows (and
keeps growing across restarts). A unit is granted to a new lease only after the old
lease ended (released or expired), so once an executor has run work for token ``t`` on
a unit, any later call for that unit with a token below ``t`` comes from a holder whose
lease is gone: a client that stalled past its TTL, lost its heartbeats, and wakes up
believing it still holds the cores. Running it would put two workloads on units the
broker gave to one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from tangram.spec import TangramError


class StaleLease(TangramError):
    """The call's fencing token is older than the newest one seen for its units."""

    def __init__(self, message: str, token: int = 0, newest: int = 0) -> None:
        super().__init__(message)
        self.token = token
        self.newest = newest

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses process boundaries (Ray) with its fields intact.
        return (StaleLease, (str(self), self.token, self.newest))


class Fence:
    """The newest fencing token seen per unit (a core id, a GPU index)."""

    __slots__ = ("newest",)

    def __init__(self) -> None:
        self.newest: dict[Hashable, int] = {}

    def admit(self, units: Iterable[Hashable], token: int | None, where: str = "") -> None:
        """Record ``token`` for ``units``, or raise ``StaleLease`` if any of them has
        seen a newer one. ``None`` (a direct call without a lease) is not checked.
        The same token again is fine: one lease may run several calls."""
        if token is None:
            return
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"a fencing token is an int, got {token!r}")
        units = list(units)
        newest, unit = max(((self.newest.get(u, 0), u) for u in units), default=(0, None))
        if token < newest:
            raise StaleLease(
                f"stale lease: fencing token {token} is older than token {newest} already "
                f"seen for unit {unit!r}{' on ' + where if where else ''}; the lease "
                "expired and its units were granted again, so this call is refused",
                token,
                newest,
            )
        for u in units:
            self.newest[u] = token
