"""Clients of a remote broker: ``HttpClient`` (asyncio) and ``SyncHttpClient``.

Every error class is exported here too: the HTTP ones (``HttpError`` and its
subclasses), ``BrokerUnreachable`` (no answer from the server), and every class of the
broker's own (each class of ``tangram.errors.CODES``), which a problem answer is raised
as."""

from tangram.client.errors import HttpError, ServerUnavailable, TooManyQueued, Unauthorized
from tangram.client.http import ActionState, HttpClient
from tangram.client.sync import SyncHttpClient
from tangram.client.wire import RemoteLease
from tangram.errors import (
    ActionCancelled,
    BrokerUnreachable,
    FencingError,
    ForgedGrant,
    GrantMismatch,
    InvalidAction,
    JournalError,
    JournalUnavailable,
    LeaseExpired,
    LeaseReleased,
    QueueFull,
    StaleLease,
    TangramError,
    Unavailable,
    UnknownAction,
    UnknownLease,
    WireError,
)
from tangram.leasing import LeaseContext

__all__ = [
    "ActionCancelled",
    "ActionState",
    "BrokerUnreachable",
    "FencingError",
    "ForgedGrant",
    "GrantMismatch",
    "HttpClient",
    "HttpError",
    "InvalidAction",
    "JournalError",
    "JournalUnavailable",
    "LeaseContext",
    "LeaseExpired",
    "LeaseReleased",
    "QueueFull",
    "RemoteLease",
    "ServerUnavailable",
    "StaleLease",
    "SyncHttpClient",
    "TangramError",
    "TooManyQueued",
    "Unauthorized",
    "Unavailable",
    "UnknownAction",
    "UnknownLease",
    "WireError",
]
