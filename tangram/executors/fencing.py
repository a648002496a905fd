"""Executor fencing: executors run work only under a grant the broker signed, for exactly
the units it names, before it expires, and never under an older fencing token than the
units have seen.

The broker gives every lease a fencing token from one counter that only grows (and
keeps growing across restarts), and, when it has a fencing key, signs what it granted:
a ``SignedGrant`` (lease id, token, per pool the node and exact units, expiry as Unix
time) with an HMAC-SHA256 under a key it shares with the executors. A unit is granted
to a new lease only after the old lease ended, so an executor refuses:

- a call without a grant, or with one whose signature does not verify under its key (a
  forged or tampered grant, a grant from another broker): ``ForgedGrant``;
- a valid grant that does not name exactly the units the call asks for on this node
  and pool: ``GrantMismatch``;
- a valid grant whose token is older than one already seen for any of its units (its
  lease expired and the units went to a newer lease that has run here already), or
  whose expiry has passed (the lease is over even if the newer holder has not reached
  this executor yet): ``StaleLease``.

A token is recorded only after every check passed, so a forged grant with a huge token
cannot lock real holders out. Heartbeats bring a fresh grant with a later expiry.
"""

from __future__ import annotations

import hmac
import json
import math
import numbers
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The refusals live in tangram/errors.py with the table of how errors travel (a Ray
# client rebuilds them by name); they are re-exported here, where callers find them.
from tangram.errors import FencingError as FencingError
from tangram.errors import ForgedGrant as ForgedGrant
from tangram.errors import GrantMismatch as GrantMismatch
from tangram.errors import StaleLease as StaleLease

# The grant's expiry is the broker's wall clock; the executor's may differ. Tolerating
# a positive offset lets a stale holder start work that long after its lease expired
# (on an executor the newer holder has not reached yet), while a held lease is
# re-signed every third of its TTL, so its grant is normally far from expiring and a
# small offset refuses nothing live. Hence no allowance by default; hosts whose clocks
# are known to be apart can pass ``skew=`` their worst offset.
DEFAULT_SKEW = 0.0
MIN_KEY_BYTES = 16
KEY_ENV = "TANGRAM_FENCING_KEY"  # where tangram.ray.start_broker looks for a key (hex)
_DOMAIN = "tangram-grant/1"

# Per pool: (pool, node or "", units). Sorted by pool, so one grant has one encoding.
GrantUnits = tuple[tuple[str, str, tuple[Any, ...]], ...]


@dataclass(frozen=True, slots=True)
class SignedGrant:
    """What the broker granted, signed: lease ``lease`` with fencing ``token`` holds
    ``units`` (per pool: node and exact unit ids) until ``expires`` (Unix time)."""

    lease: str
    token: int
    units: GrantUnits
    expires: float
    signature: bytes
    # Per pool whose units the lease shares with others (a GPU instance's request
    # slots): the instance's epoch, the token the fence orders those units by.
    epochs: tuple[tuple[str, int], ...] = ()

    def message(self) -> bytes:
        return _message(self.lease, self.token, self.units, self.expires, self.epochs)

    def token_for(self, pool: str) -> int:
        """The fencing token that orders this grant's units of ``pool``."""
        for p, epoch in self.epochs:
            if p == pool:
                return epoch
        return self.token

    def of(self, pool: str) -> tuple[str, tuple[Any, ...]] | None:
        """(node, units) granted on ``pool``, or None."""
        for p, node, units in self.units:
            if p == pool:
                return node, units
        return None


def _unit(u: Any) -> Any:
    # numpy integers and the like, which json cannot write; anything else is a bug.
    if isinstance(u, numbers.Integral):
        return int(u)
    raise TypeError(f"cannot sign unit {u!r} of type {type(u).__name__}")


def _message(
    lease: str,
    token: int,
    units: GrantUnits,
    expires: float,
    epochs: tuple[tuple[str, int], ...] = (),
) -> bytes:
    # JSON arrays of strings and numbers are unambiguous, and ``repr`` of a float (what
    # json writes) reads back to the same float, so an unpickled grant re-encodes to the
    # very bytes that were signed. Epochs are appended only when there are any, so a
    # grant without shared units is signed as before.
    body: list[Any] = [_DOMAIN, lease, token, [[p, n, list(u)] for p, n, u in units], expires]
    if epochs:
        body.append([[p, e] for p, e in epochs])
    return json.dumps(body, separators=(",", ":"), default=_unit).encode()


def _check_key(key: Any) -> bytes:
    if not isinstance(key, (bytes, bytearray)):
        raise TypeError(f"a fencing key is bytes, got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"a fencing key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}; "
            "secrets.token_bytes(32) makes a good one"
        )
    return bytes(key)


def key_id(key: bytes) -> str:
    """A short public fingerprint of ``key``: tells whether two processes share a key
    without revealing it."""
    return hmac.digest(key, b"tangram-key-id", "sha256")[:8].hex()


class GrantSigner:
    """Signs and verifies grants with one key (the broker's and its executors')."""

    __slots__ = ("_key", "key_id")

    def __init__(self, key: bytes) -> None:
        self._key = _check_key(key)
        self.key_id = key_id(self._key)

    def sign(
        self, lease: str, token: int, allocation: Mapping[str, Any], expires: float
    ) -> SignedGrant:
        """Sign lease ``lease`` with fencing ``token`` holding ``allocation`` (pool ->
        ``Allocation``, or anything with ``node`` and ``units``) until ``expires``
        (Unix time)."""
        units: GrantUnits = tuple(
            (pool, a.node or "", tuple(a.units)) for pool, a in sorted(allocation.items())
        )
        epochs = tuple(
            (pool, int(a.epoch)) for pool, a in sorted(allocation.items()) if getattr(a, "epoch", 0)
        )
        expires = float(expires)
        msg = _message(lease, token, units, expires, epochs)
        sig = hmac.digest(self._key, msg, "sha256")
        return SignedGrant(lease, token, units, expires, sig, epochs)

    def verify(self, grant: SignedGrant) -> bool:
        """Whether ``grant`` was signed with this key and not changed since."""
        if not isinstance(grant, SignedGrant) or not isinstance(grant.signature, bytes):
            return False
        try:
            msg = grant.message()
        except (TypeError, ValueError):
            return False  # a field no signer would have produced
        return hmac.compare_digest(hmac.digest(self._key, msg, "sha256"), grant.signature)


class Fence:
    """Checks grants against the executor's key and remembers the newest fencing token
    seen per unit (a core id, a GPU index).

    ``Fence(key)`` refuses every call without a valid grant. ``Fence(None,
    verify=False)`` is for trusted direct use (tests, a process running its own
    trusted commands): calls without a grant are not fenced at all; a grant given to
    it is still checked, which needs a key, so without one it is refused."""

    __slots__ = ("clock", "newest", "signer", "skew", "verify")

    def __init__(
        self,
        key: bytes | None,
        *,
        verify: bool = True,
        skew: float = DEFAULT_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if key is None and verify:
            raise ValueError(
                "executor fencing needs the broker's fencing key to check grants "
                "(tangram.ray.start_broker hands it to its executors); for trusted direct "
                "use without grants, build it with verify=False (trusted=True on the runners)"
            )
        if (
            isinstance(skew, bool)
            or not isinstance(skew, (int, float))
            or not (math.isfinite(skew) and skew >= 0)
        ):
            raise ValueError(f"skew must be a finite number of seconds >= 0, got {skew!r}")
        self.signer = GrantSigner(key) if key is not None else None
        self.verify = verify
        self.skew = float(skew)
        self.clock = clock
        self.newest: dict[Hashable, int] = {}

    def admit(
        self,
        units: Iterable[Hashable],
        grant: SignedGrant | None,
        where: str = "",
        *,
        node: str = "",
        pool: str | None = None,
    ) -> None:
        """Admit a call on ``units`` of ``node`` (and ``pool``; None: whichever pool the
        grant names them under) under ``grant``, recording its token; or raise
        ``ForgedGrant``, ``GrantMismatch`` or ``StaleLease`` and record nothing. The same
        grant again is fine: one lease may run several calls."""
        at = f" on {where}" if where else ""
        if grant is None:
            if not self.verify:
                return
            raise ForgedGrant(
                f"unsigned call{at}: no grant was given; pass the lease's signed grant "
                "(lease.grant, set by a broker with a fencing key), or use a trusted "
                "executor (trusted=True) for direct use without leases"
            )
        if not isinstance(grant, SignedGrant):
            raise ForgedGrant(
                f"refused{at}: expected the lease's SignedGrant, got {type(grant).__name__} "
                f"{grant!r}; bare fencing tokens are not accepted any more (pass lease.grant)"
            )
        if self.signer is None:
            raise ForgedGrant(
                f"refused{at}: this executor has no fencing key, so it cannot check the "
                f"grant of lease {grant.lease!r}; give it the broker's key"
            )
        if not self.signer.verify(grant):
            raise ForgedGrant(
                f"forged grant{at}: the signature of lease {grant.lease!r}'s grant (fencing "
                f"token {grant.token}) does not verify under this executor's key (key id "
                f"{self.signer.key_id}); it was not signed by this broker or was changed"
            )
        want = tuple(units)
        covering = self._covers(grant, want, node, pool)
        if covering is None:
            held = ", ".join(f"{p}@{n or '-'}{list(u)}" for p, n, u in grant.units) or "none"
            raise GrantMismatch(
                f"grant mismatch{at}: lease {grant.lease!r} was granted {held}, not units "
                f"{list(want)} on node {node!r}" + (f" of pool {pool!r}" if pool else "")
            )
        # Units shared by one engine instance's actions are ordered by the instance's
        # epoch: every action on it presents the same, older than any later holder's.
        token = grant.token_for(covering)
        newest, unit = max(((self.newest.get(u, 0), u) for u in want), default=(0, None))
        if token < newest:
            raise StaleLease(
                f"stale lease: fencing token {token} is older than token {newest} already "
                f"seen for unit {unit!r}{at}; the lease expired and its units were granted "
                "again, so this call is refused",
                token,
                newest,
            )
        now = self.clock()
        if now > grant.expires + self.skew:
            raise StaleLease(
                f"stale lease: the grant of lease {grant.lease!r} (fencing token {token}) "
                f"expired {now - grant.expires:.3f} s ago{at}; its units may already belong "
                "to a newer lease, so this call is refused (heartbeats renew the grant)",
                token,
                newest,
            )
        for u in want:
            self.newest[u] = token

    @staticmethod
    def _covers(
        grant: SignedGrant, want: tuple[Hashable, ...], node: str, pool: str | None
    ) -> str | None:
        """The pool under which ``grant`` names exactly ``want`` on ``node``, or None."""
        ask = set(want)
        if not ask or len(ask) != len(want):
            return None
        for p, n, u in grant.units:
            if (pool is None or p == pool) and n == node and len(u) == len(ask) and set(u) == ask:
                return p
        return None
