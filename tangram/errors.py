"""Every error Tangram raises on purpose, and the one table of how each one travels.

An error leaves the process that raised it three ways: as an HTTP problem (a status and a
problem ``type``), as a Ray reply's class name with its message, and pickled inside a Ray
task error (the executors' fencing refusals). ``CODES`` is the only place that says which
name, HTTP status and problem type each class has. The HTTP server answers with it
(tangram/server/problems.py), the HTTP client raises from it (tangram/client/errors.py)
and the Ray client rebuilds from it (tangram/ray/transport.py), so no side can know a class
the others do not.

The classes live here rather than beside the code that raises them so that this module
imports nothing of Tangram: the executors, the clients and the core can all use it.
``tangram.spec``, ``tangram.journal`` and ``tangram.executors.fencing`` re-export them
under their old names.
"""

from __future__ import annotations

from dataclasses import dataclass


class TangramError(Exception):
    """Base class of every error Tangram raises on purpose."""


class InvalidAction(TangramError):
    """The action can never be granted as written; the message says why and what would fit.

    ``reason`` is a short code for metrics and clients: malformed, bad_demand,
    unknown_pool, unknown_service, never_fits, duplicate_id."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class QueueFull(TangramError):
    """A pool's queue is at its bound (``max_queued_per_pool``): try again later. Nothing
    was queued."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(TangramError):
    """The broker cannot make a change durable now (its journal cannot write, e.g. a full
    disk): nothing that anyone was told of is lost; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownLease(TangramError):
    """No lease with that id exists (or it is another tenant's)."""


class UnknownAction(TangramError):
    """No action with that id exists (or it is another tenant's)."""


class LeaseExpired(TangramError):
    """The lease ran past its TTL without a heartbeat; its units were taken back."""


class LeaseReleased(TangramError):
    """The lease was already released (a heartbeat after release is a client bug)."""


class BrokerUnreachable(TangramError):
    """No answer from the broker (nothing listens at the URL, the connection broke, or
    no answer came in time), after the client's retries. ``url`` is where it was asked,
    ``__cause__`` the transport's own error. Raised by the HTTP client itself; the call
    may or may not have reached the broker (every call is safe to repeat)."""

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class ActionCancelled(TangramError):
    """The queued action was cancelled before it was granted."""


class WireError(TangramError):
    """A body of the wire format (tangram/wire.py) that this Tangram cannot read: another
    schema version, or a malformed body."""


class JournalError(TangramError):
    """The journal cannot be opened or written (at start-up: the data directory)."""


class JournalUnavailable(JournalError, Unavailable):
    """A write failed (full disk, read-only file, locked database): the broker grants
    nothing new and answers 503 until a write succeeds again."""


class FencingError(TangramError):
    """An executor refused a call because of its grant; nothing ran."""


class StaleLease(FencingError):
    """The grant's lease is over: its fencing token is older than the newest one seen for
    its units, or its expiry has passed."""

    def __init__(self, message: str, token: int = 0, newest: int = 0) -> None:
        super().__init__(message)
        self.token = token
        self.newest = newest

    def __reduce__(self) -> tuple[object, ...]:
        # Crosses process boundaries (Ray) with its fields intact.
        return (StaleLease, (str(self), self.token, self.newest))


class ForgedGrant(FencingError):
    """No grant, not a grant, or a signature that does not verify under the executor's
    key (forged, tampered with, or signed by another broker)."""


class GrantMismatch(FencingError):
    """A genuine grant, but not for the units (pool, node, exact ids) the call asked for."""


# --------------------------------------------------------------------------- the table
TYPE_BASE = "https://tangram.dev/problems/"  # problem types are TYPE_BASE + kind


@dataclass(frozen=True, slots=True)
class Code:
    """How one error class travels: its name (the class name, what the Ray wire carries),
    its HTTP status, and its problem type's last segment (``kind``)."""

    cls: type[TangramError]
    status: int
    kind: str

    @property
    def name(self) -> str:
        return self.cls.__name__


# A class raised that is not listed travels as its nearest listed base class. Each kind
# names one class, except that a subclass may answer with its base's kind when HTTP
# clients already know that one: then they get the base class back (JournalUnavailable
# is told as 503 ``unavailable``, as documented; the Ray wire keeps its own name).
CODES: tuple[Code, ...] = (
    Code(TangramError, 409, "conflict"),
    Code(InvalidAction, 422, "invalid-action"),
    Code(QueueFull, 429, "too-many-queued"),
    Code(Unavailable, 503, "unavailable"),
    Code(UnknownLease, 404, "unknown-lease"),
    Code(UnknownAction, 404, "unknown-action"),
    Code(LeaseExpired, 410, "lease-expired"),
    Code(LeaseReleased, 409, "lease-released"),
    Code(ActionCancelled, 409, "action-cancelled"),
    Code(WireError, 422, "unreadable-body"),
    Code(JournalError, 503, "journal-error"),
    Code(JournalUnavailable, 503, "unavailable"),
    Code(FencingError, 403, "fencing-refused"),
    Code(StaleLease, 409, "stale-lease"),
    Code(ForgedGrant, 403, "forged-grant"),
    Code(GrantMismatch, 403, "grant-mismatch"),
    # The HTTP client raises it when no answer comes back; Tangram's server never answers
    # with it, a gateway in front of the broker may (as a 502 of this type).
    Code(BrokerUnreachable, 502, "broker-unreachable"),
)

_BY_CLASS: dict[type[BaseException], Code] = {c.cls: c for c in CODES}
_BY_NAME: dict[str, Code] = {c.name: c for c in CODES}
_BY_KIND: dict[str, Code] = {}
for _code in CODES:
    _BY_KIND.setdefault(_code.kind, _code)  # the first (the base) owns a shared kind
del _code


def code_of(error: BaseException | type[BaseException]) -> Code:
    """The code of an error (or error class): its own, else its nearest listed base's;
    ``TangramError``'s for anything else."""
    cls = error if isinstance(error, type) else type(error)
    for base in cls.__mro__:
        code = _BY_CLASS.get(base)
        if code is not None:
            return code
    return _BY_CLASS[TangramError]


def name_of(error: BaseException) -> str:
    """The name an error travels under on the Ray wire."""
    return code_of(error).name


def class_named(name: str | None) -> type[TangramError]:
    """The class a Ray reply's error name stands for (``TangramError`` for a name this
    version does not know, or none)."""
    code = _BY_NAME.get(name or "")
    return TangramError if code is None else code.cls


def from_name(name: str | None, message: str | None) -> TangramError:
    """The error a Ray reply describes, as its own class."""
    return class_named(name)(message or name or "error")


def class_of_kind(problem_type: str) -> type[TangramError] | None:
    """The class an HTTP problem ``type`` stands for, or None when it names no class
    (an HTTP-only problem such as ``unauthorized``, or another server's type)."""
    if not problem_type.startswith(TYPE_BASE):
        return None
    code = _BY_KIND.get(problem_type[len(TYPE_BASE) :])
    return None if code is None else code.cls
