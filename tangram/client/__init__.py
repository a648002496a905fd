"""Clients of a remote broker: ``HttpClient`` (asyncio) and ``SyncHttpClient``.

The errors they raise are exported here too: the HTTP ones (``HttpError`` and its
subclasses) and the broker's own, which a problem answer is raised as."""

from tangram.client.errors import HttpError, ServerUnavailable, TooManyQueued, Unauthorized
from tangram.client.http import ActionState, HttpClient
from tangram.client.sync import SyncHttpClient
from tangram.client.wire import RemoteLease
from tangram.errors import (
    ActionCancelled,
    InvalidAction,
    LeaseExpired,
    LeaseReleased,
    QueueFull,
    TangramError,
    Unavailable,
    UnknownAction,
    UnknownLease,
)
from tangram.leasing import LeaseContext

__all__ = [
    "ActionCancelled",
    "ActionState",
    "HttpClient",
    "HttpError",
    "InvalidAction",
    "LeaseContext",
    "LeaseExpired",
    "LeaseReleased",
    "QueueFull",
    "RemoteLease",
    "ServerUnavailable",
    "SyncHttpClient",
    "TangramError",
    "TooManyQueued",
    "Unauthorized",
    "Unavailable",
    "UnknownAction",
    "UnknownLease",
]
