"""Clients of a remote broker: ``HttpClient`` (asyncio) and ``SyncHttpClient``."""

from tangram.client.errors import HttpError, TooManyQueued, Unauthorized
from tangram.client.http import ActionState, HttpClient, LeaseContext
from tangram.client.sync import SyncHttpClient
from tangram.client.wire import RemoteLease

__all__ = [
    "ActionState",
    "HttpClient",
    "HttpError",
    "LeaseContext",
    "RemoteLease",
    "SyncHttpClient",
    "TooManyQueued",
    "Unauthorized",
]
